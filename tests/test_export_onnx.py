"""ONNX export: the onnxruntime pipeline generates what the PyTorch pipeline generates (stated tolerance),
for a plain model with CFG and for an elastic variant; CLI; clear errors for broken exports."""

import json

import numpy as np
import pytest
import torch

from snapgen.cli import main
from snapgen.export.common import standalone_transformer
from snapgen.export.onnx import OnnxPipeline, export_onnx, parameter_bytes
from snapgen.pipelines import TextToImagePipeline

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.export

# Parity tolerance: fp32 graphs, same noise; measured ~1e-5 on the shipped model over a 20-step CFG run.
LATENT_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(elastic_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "small"
    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="small")
    export_onnx(pipe, out, progress=False)
    return out


def test_onnx_pipeline_matches_pytorch_with_cfg(elastic_folder, exported):
    meta = json.loads((exported / "export.json").read_text())
    assert meta["variant"] == "small" and meta["batch"] == 2 and meta["guidance"] == 3.0
    onnx_pipe = OnnxPipeline(exported)
    torch_pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="small")
    prompts = ["a red circle to the left of a blue square", "two green hearts"]
    a = onnx_pipe(prompts, seed=5, return_latents=True)
    b = torch_pipe(prompts, seed=5, return_latents=True)
    assert b.abs().mean() > 0.1
    torch.testing.assert_close(a, b, atol=LATENT_ATOL, rtol=0)
    ia = np.stack([np.asarray(im, dtype=np.int16) for im in onnx_pipe(prompts, seed=5)])
    ib = np.stack([np.asarray(im, dtype=np.int16) for im in torch_pipe(prompts, seed=5)])
    assert np.abs(ia - ib).max() <= 1
    # the DiT graph is the extracted small variant (not the supernetwork)
    assert meta["files"]["dit.onnx"] < 0.6 * (4 * torch_pipe.transformer.num_parameters())


def test_onnx_pipeline_takes_a_seed_per_prompt_like_pytorch(elastic_folder, exported):
    """seed=[...] (what `snapgen eval` passes): image i has its own generator, so it is the one-prompt image of
    seed[i] whatever the batch (the exported runtimes run the batch one sample at a time: exactly), and the
    PyTorch pipeline's per-image image (ExecuTorch shares this code: ExportedPipeline.__call__)."""
    onnx_pipe = OnnxPipeline(exported)
    torch_pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="small")
    prompts = ["a red circle to the left of a blue square", "two green hearts"]
    a = onnx_pipe(prompts, seed=[5, 6], return_latents=True)
    assert torch.equal(a[1], onnx_pipe([prompts[1]], seed=6, return_latents=True)[0])
    assert torch.equal(a[0], onnx_pipe(prompts[::-1], seed=[6, 5], return_latents=True)[1])
    torch.testing.assert_close(a, torch_pipe(prompts, seed=[5, 6], return_latents=True), atol=LATENT_ATOL, rtol=0)
    assert (a[1] - onnx_pipe(prompts, seed=5, return_latents=True)[1]).abs().max() > 0.1  # an int: batch noise
    with pytest.raises(ValueError, match=r"list of 1 seed\(s\) but 2 prompt\(s\)"):
        onnx_pipe(prompts, seed=[5])


def test_cli_export_and_generate_onnx(elastic_folder, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["export", "onnx", "--model", str(elastic_folder), "--variant", "tiny", "--out",
                 str(out)]) == 0
    assert "--backend onnx" in capsys.readouterr().out
    assert main(["generate", "a blue star", "--backend", "onnx", "--model", str(out), "--out",
                 str(tmp_path / "a.png"), "--seed", "2"]) == 0
    assert "(onnxruntime)" in capsys.readouterr().out
    assert main(["generate", "a blue star", "--model", str(elastic_folder), "--variant", "tiny", "--out",
                 str(tmp_path / "b.png"), "--seed", "2", "--no-progress"]) == 0
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1
    assert main(["generate", "x", "--backend", "onnx", "--model", str(out), "--steps", "3"]) == 2
    assert "fixed at export time" in capsys.readouterr().err


def test_broken_exports_fail_clearly(exported, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="not a snapgen onnx export"):
        OnnxPipeline(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "dit.onnx").write_bytes((bad / "dit.onnx").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        OnnxPipeline(bad)
    (bad / "dit.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        OnnxPipeline(bad)
    (bad / "export.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        OnnxPipeline(bad)


def test_export_refuses_bad_resolution_and_variant(elastic_folder, tmp_path):
    pipe = TextToImagePipeline.from_pretrained(elastic_folder)
    with pytest.raises(ValueError, match="multiple"):
        export_onnx(pipe, tmp_path / "x", resolution=(17, 16), progress=False)
    with pytest.raises(ValueError, match="unknown variant"):
        TextToImagePipeline.from_pretrained(elastic_folder, variant="medium")



def _latents_and_images(pipe, prompts, seed=5):
    latents = pipe(prompts, seed=seed, return_latents=True)
    return latents, np.stack([np.asarray(im, dtype=np.int16) for im in pipe(prompts, seed=seed)])


def test_external_data_export_loads_and_generates_the_same_images(elastic_folder, exported, tmp_path):
    """Threshold 0 forces every graph's weights into ``<graph>.onnx.data`` (what a >2 GB model gets)."""
    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="small")
    out = export_onnx(pipe, tmp_path / "ext", progress=False, external_threshold=0)
    meta, plain = (json.loads((d / "export.json").read_text()) for d in (out, exported))
    assert meta["external_data"] == {f"{n}.onnx": f"{n}.onnx.data" for n in ("text", "dit", "decoder")}
    assert "external_data" not in plain and not list(exported.glob("*.data"))  # default threshold: inline
    # the weights live in the .data file (the protobuf keeps the graph and the exporter's folded constants)
    weights = parameter_bytes(standalone_transformer(pipe))
    assert meta["files"]["dit.onnx.data"] >= weights
    assert abs(plain["files"]["dit.onnx"] - meta["files"]["dit.onnx"] - weights) < 0.1 * weights
    prompts = ["a red circle to the left of a blue square", "two green hearts"]
    a, ia = _latents_and_images(OnnxPipeline(out), prompts)
    b, ib = _latents_and_images(OnnxPipeline(exported), prompts)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # the same graph and weights, stored elsewhere
    assert np.array_equal(ia, ib)
    (out / "dit.onnx.data").unlink()  # a folder copied without its weights file
    with pytest.raises(FileNotFoundError, match=r"dit\.onnx\.data.*incomplete"):
        OnnxPipeline(out)


# fp16 graphs against fp32 graphs on onnxruntime's CPU provider, same noise, the tiny test model's CFG sampler:
# measured max |diff| of the latents 2.3e-3, images within 1 level of 255; held to ~4x that.
FP16_LATENT_ATOL = 1e-2


def test_fp16_export_has_fp16_weights_and_generates_close_to_fp32(elastic_folder, exported, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="small")
    assert main(["export", "onnx", "--model", str(elastic_folder), "--variant", "small", "--dtype", "fp16",
                 "--out", str(tmp_path / "fp16")]) == 0
    out = tmp_path / "fp16"
    meta, plain = (json.loads((d / "export.json").read_text()) for d in (out, exported))
    assert meta["dtype"] == "float16" and plain["dtype"] == "float32"
    names = {n for n, _ in pipe.extract("small").transformer.named_parameters()}
    for graph in ("text", "dit", "decoder"):
        model = onnx.load(str(out / f"{graph}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        floats = [i for i in model.graph.initializer
                  if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        n16 = sum(int(np.prod(i.dims)) for i in floats if i.data_type == onnx.TensorProto.FLOAT16)
        n32 = sum(int(np.prod(i.dims)) for i in floats if i.data_type == onnx.TensorProto.FLOAT)
        assert n16 > 0 and n32 < 0.01 * n16, (graph, n16, n32)  # fp32 left: a few constants (time frequencies)
        if graph == "dit":  # every exported parameter of the model is an fp16 initializer
            params = [i for i in model.graph.initializer if i.name.removeprefix("model.") in names]
            assert len(params) > 20 and all(i.data_type == onnx.TensorProto.FLOAT16 for i in params)
            session = ort.InferenceSession(str(out / "dit.onnx"), providers=["CPUExecutionProvider"])
            assert {i.name: i.type for i in session.get_inputs()} == {
                "x": "tensor(float16)", "t": "tensor(float16)", "text": "tensor(float16)", "text_mask": "tensor(bool)"}
    def float_bytes(path):  # the weights' share of a file (the rest: graph, folded integer index tables)
        return sum(int(np.prod(i.dims)) * {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}[i.data_type]
                   for i in onnx.load(str(path)).graph.initializer
                   if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))

    assert 0.49 < float_bytes(out / "dit.onnx") / float_bytes(exported / "dit.onnx") < 0.51
    assert next(pipe.transformer.parameters()).dtype == torch.float32  # the export cast copies
    prompts = ["a red circle to the left of a blue square", "two green hearts"]
    a, ia = _latents_and_images(OnnxPipeline(out), prompts)
    b, ib = _latents_and_images(OnnxPipeline(exported), prompts)
    assert a.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(a, b, atol=FP16_LATENT_ATOL, rtol=0)
    assert np.abs(ia - ib).max() <= 4


def test_dtype_flag_is_onnx_only(elastic_folder, tmp_path, capsys):
    assert main(["export", "executorch", "--model", str(elastic_folder), "--dtype", "fp16", "--out",
                 str(tmp_path / "x")]) == 2
    assert "onnx export option" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_onnx(TextToImagePipeline.from_pretrained(elastic_folder), tmp_path / "y", dtype="bf16")


# ------------------------------------------------------------------------------------- device rewrite + mobile
def test_device_rewrite_is_numerically_equal_and_exports_to_onnx(elastic_folder, tmp_path):
    from snapgen.export.common import device_rewrite, standalone_transformer

    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="small")
    model = standalone_transformer(pipe)
    x = torch.randn(2, 4, 8, 8)
    t = torch.rand(2)
    text = torch.randn(2, 5, model.config.text_dim)
    ref = model(x, t, {"text": text})
    torch.testing.assert_close(device_rewrite(model)(x, t, {"text": text}), ref, atol=1e-5, rtol=1e-5)
    export_onnx(pipe, tmp_path / "rw", rewrite=True, progress=False)
    torch.testing.assert_close(OnnxPipeline(tmp_path / "rw")(["a cat"], seed=1, return_latents=True),
                               pipe(["a cat"], seed=1, return_latents=True), atol=LATENT_ATOL, rtol=0)


# ExecuTorch's XNNPACK kernels reorder fp32 arithmetic (fused GEMMs, its own softmax): measured ~2e-3 on the
# shipped model's velocities; latents after a few steps are held to this tolerance.
EXECUTORCH_ATOL = 1e-2


def test_executorch_lowers_a_graph_that_its_runtime_runs_like_pytorch(elastic_folder, tmp_path):
    """Fast twin of the end-to-end test below (one graph of the three, no sampling loop): the XNNPACK lowering
    and ExecuTorch's runtime give the PyTorch decoder's output."""
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    from snapgen.export.common import pipeline_graphs
    from snapgen.export.mobile import _write_pte

    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="tiny")
    module, args, ins, outs = pipeline_graphs(pipe, rewrite=True)["graphs"]["decoder"]
    _write_pte(module, args, tmp_path / "decoder.pte", ins, outs)
    method = Runtime.get().load_program(str(tmp_path / "decoder.pte")).load_method("forward")
    x = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3))
    (got,) = method.execute([x])
    with torch.no_grad():
        want = module(x)
    assert got.shape == want.shape and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=EXECUTORCH_ATOL, rtol=0)


@pytest.mark.slow  # ~90 s on 2 cores: three graphs lowered; the fast twin above lowers and runs one
def test_executorch_pipeline_matches_pytorch(elastic_folder, tmp_path, capsys):
    pytest.importorskip("executorch")
    from snapgen.export.mobile import ExecuTorchPipeline, export_executorch

    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="tiny")
    export_executorch(pipe, tmp_path / "et", progress=False)
    et = ExecuTorchPipeline(tmp_path / "et")
    a = et(["a red circle"], seed=2, return_latents=True)
    b = pipe(["a red circle"], seed=2, return_latents=True)
    torch.testing.assert_close(a, b, atol=EXECUTORCH_ATOL, rtol=0)
    assert main(["generate", "a red circle", "--backend", "executorch", "--model", str(tmp_path / "et"),
                 "--out", str(tmp_path / "x.png")]) == 0
    assert "(ExecuTorch)" in capsys.readouterr().out


def test_coreml_conversion_writes_packages(elastic_folder, tmp_path):
    pytest.importorskip("coremltools")
    from snapgen.export.mobile import export_coreml

    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="tiny")
    out = export_coreml(pipe, tmp_path / "cm", progress=False)
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "snapgen-coreml" and meta["rewrite"] is True
    for name in ("text", "dit", "decoder"):
        assert (out / f"{name}.mlpackage" / "Manifest.json").is_file()
        assert meta["files"][f"{name}.mlpackage"] > 0


def test_coreml_palettizes_clustered_weights_losslessly_into_their_own_luts(tmp_path):
    """Fast twin of the quantized-DiT test below: a small MLP whose weights hold 16 / 256 / many distinct values;
    the two clustered ones become look-up tables of exactly their values, the dense one stays dense."""
    pytest.importorskip("coremltools")
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    from snapgen.export.mobile import _write_mlpackage

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 96), torch.nn.GELU(),
                              torch.nn.Linear(96, 32)).eval()
    values = {}
    with torch.no_grad():
        for layer, k in ((net[0], 16), (net[2], 256)):
            lut = torch.linspace(-2.0, 2.0, k)[torch.randperm(k, generator=g)].half().float()  # k distinct, no 0
            layer.weight.copy_(lut[torch.randint(k, layer.weight.shape, generator=g)])
            values[k] = {float(v) for v in lut.half()}
    extra = _write_mlpackage(net, (torch.randn(2, 64),), tmp_path / "mlp.mlpackage", ["x"], ["y"], palettize=True)
    assert extra["palettized_weights"] == 2
    model = ct.models.MLModel(str(tmp_path / "mlp.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    program = load_mil(spec, spec.specificationVersion, model.weights_dir)
    luts = sorted((np.asarray(op.lut.val).ravel() for f in program.functions.values() for op in f.operations
                   if "lut_to_dense" in op.op_type), key=len)
    assert [len(v) for v in luts] == [16, 256]
    assert {float(v) for v in luts[0]} == values[16] and {float(v) for v in luts[1]} == values[256]


@pytest.mark.slow  # ~50 s on 2 cores (quantize + two exports); the fast twin above checks the palettization
def test_coreml_palettizes_a_quantized_dit_with_its_own_clusters(elastic_folder, tmp_path):
    pytest.importorskip("coremltools")
    import numpy as np

    from snapgen.export.mobile import export_coreml
    from snapgen.export.quantize import quantize_pipeline

    pipe = TextToImagePipeline.from_pretrained(elastic_folder, variant="tiny")
    qdir = quantize_pipeline(pipe, tmp_path / "q", ["a red circle", "pizza"], finetune_steps=2,
                             progress=lambda *_: None)
    q = TextToImagePipeline.from_pretrained(qdir)
    out = export_coreml(q, tmp_path / "cm", progress=False)
    meta = json.loads((out / "export.json").read_text())
    assert meta["palettized_weights"] > 0 and not (out / "dit.palettized").exists()
    plain = export_coreml(pipe, tmp_path / "plain", progress=False)
    assert "palettized_weights" not in json.loads((plain / "export.json").read_text())
    assert meta["files"]["dit.mlpackage"] < 0.6 * json.loads((plain / "export.json").read_text())["files"]["dit.mlpackage"]
    # the look-up tables are snapgen's centroids: every clustered weight's values are among its LUT entries
    import coremltools as ct

    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    model = ct.models.MLModel(str(out / "dit.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    program = load_mil(spec, spec.specificationVersion, model.weights_dir)
    lut_ops = [op for f in program.functions.values() for op in f.operations if "lut_to_dense" in op.op_type]
    assert len(lut_ops) == meta["palettized_weights"]
    state = q.transformer.state_dict()
    centroids = {float(v) for t in state.values() if t.unique().numel() <= 256 for v in t.half().unique()}
    # only the entries the indices use: coremltools pads a LUT to 2^nbits entries with zeros (a 6-bit LUT of
    # 64 for a weight it stores at 6 bits), and padding entries are never read
    from coremltools.optimize._utils import restore_elements_from_packed_bits

    used = set()
    for op in lut_ops:
        lut, idx, n = np.asarray(op.lut.val).ravel(), np.asarray(op.indices.val), int(np.prod(op.shape.val))
        if idx.size != n:  # packed sub-byte indices
            idx = restore_elements_from_packed_bits(idx, int(np.log2(lut.size)), n)
        used |= {float(v) for v in lut[np.unique(idx)]}
    assert used and used <= centroids
