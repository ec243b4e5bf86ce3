"""snapgen.text: frozen encoders (real MiniLM + tiny random transformers models), TextConditioning,
CachedTextEncoder, and the errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from snapgen.text import (
    CachedTextEncoder,
    HFTextEncoder,
    MiniLMEncoder,
    TextConditioning,
    TextEncoder,
    minilm_path,
)

CAPTIONS = ["a cat",
            "a red bicycle leaning against a brick wall in the late afternoon sun",
            "dog",
            "an astronaut riding a horse on the moon, digital art"]
LONG = " ".join(["a very long caption about many small colourful things"] * 12)


# ------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder()


def test_minilm_shapes_mask_and_padding(minilm):
    assert minilm.dim == 384 and minilm.max_length == 32 and minilm.name == "all-MiniLM-L6-v2"
    tokens, mask = minilm.encode(CAPTIONS)
    ref = minilm.tokenizer(CAPTIONS, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    assert tokens.dtype == torch.float32 and mask.dtype == torch.bool
    assert tokens.shape == (4, ref["attention_mask"].shape[1], 384)
    assert torch.equal(mask, ref["attention_mask"].bool())
    assert mask.sum(1).max() == tokens.shape[1]  # padding="longest"
    assert torch.all(tokens[~mask] == 0)
    assert tokens[mask].abs().sum(-1).min() > 0
    assert torch.isfinite(tokens).all()


def test_minilm_frozen(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training  # stays in eval (no dropout) whatever the parent does
    minilm.eval()
    assert sum(p.numel() for p in minilm.parameters()) == 22_713_216


def test_minilm_deterministic_and_discriminative(minilm):
    a, ma = minilm.encode(CAPTIONS)
    b, mb = minilm.encode(CAPTIONS)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    t, m = minilm.encode(["a photo of a cat", "a photo of a dog"])
    assert torch.equal(m[0], m[1])  # same token count, so the comparison is position by position
    assert (t[0] - t[1]).abs().max() > 0.1


def test_minilm_batch_companions_do_not_matter(minilm):
    """Right padding + attention mask: a caption's features do not depend on the rest of its batch, up
    to float noise of the differently shaped matmuls (measured ~2e-6; features are O(1))."""
    batch = CAPTIONS + [LONG]
    tokens, mask = minilm.encode(batch)
    for i, c in enumerate(batch):
        alone, m1 = minilm.encode([c])
        n = int(m1.sum())
        assert n == int(mask[i].sum())
        torch.testing.assert_close(tokens[i, :n], alone[0, :n], atol=1e-5, rtol=0)


def test_minilm_truncation(minilm):
    tokens, mask = minilm.encode([LONG, "a cat"])
    assert tokens.shape == (2, 32, 384)
    assert mask[0].all() and mask[1].sum() == 4  # [CLS] a cat [SEP]
    ids = minilm.tokenize([LONG])["input_ids"][0]
    assert len(ids) == 32 and ids[-1] == minilm.tokenizer.sep_token_id


# ------------------------------------------------------------- tiny random transformers models
def _tiny_models():
    from transformers import (
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5Model,
    )
    V = 30522  # the MiniLM tokenizer's vocabulary, shared by all tiny models
    clip_text = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 16}
    clip_vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 4, "image_size": 32, "patch_size": 16}
    dec = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0}
    return {
        # name: (model, function(model, ids, mask) -> last hidden state of the part we expect to be used)
        "bert": (BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64)),
                 lambda m, i, a: m(input_ids=i, attention_mask=a).last_hidden_state),
        "t5": (T5Model(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
               lambda m, i, a: m.encoder(input_ids=i, attention_mask=a).last_hidden_state),
        "clip": (CLIPModel(CLIPConfig(text_config=clip_text, vision_config=clip_vision, projection_dim=16)),
                 lambda m, i, a: m.text_model(input_ids=i, attention_mask=a).last_hidden_state),
        "clip_text": (CLIPTextModel(CLIPTextConfig(**clip_text)),
                      lambda m, i, a: m(input_ids=i, attention_mask=a).last_hidden_state),
        "llama": (LlamaForCausalLM(LlamaConfig(**dec)),
                  lambda m, i, a: m.model(input_ids=i, attention_mask=a).last_hidden_state),
        "gemma": (GemmaForCausalLM(GemmaConfig(**dec)),
                  lambda m, i, a: m.model(input_ids=i, attention_mask=a).last_hidden_state),
    }


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Each tiny model saved with save_pretrained + the MiniLM tokenizer, and a reference output computed
    with the in-memory model (so a load that silently re-initialises weights would be caught)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    batch = tok(["a photo of a cat"], return_tensors="pt")
    torch.manual_seed(0)
    out = {}
    for name, (model, ref_fn) in _tiny_models().items():
        folder = tmp_path_factory.mktemp(name)
        model.eval()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        with torch.no_grad():
            ref = ref_fn(model, batch["input_ids"], batch["attention_mask"])[0]
        out[name] = (folder, ref)
    return out


@pytest.mark.parametrize("name", ["bert", "t5", "clip", "clip_text", "llama", "gemma"])
def test_hf_encoder_tiny(tiny_folders, name):
    folder, ref = tiny_folders[name]
    enc = HFTextEncoder(folder, max_length=16)
    assert isinstance(enc, TextEncoder) and enc.dim == 32 and enc.max_length == 16 and enc.name == folder.name
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.model.training
    if name.startswith("clip"):
        assert type(enc.model).__name__ == "CLIPTextModel"  # text tower only
    if name == "t5":
        assert type(enc.model).__name__ == "T5EncoderModel"
    # loaded weights, not a fresh init: the reference from the saved in-memory model
    alone, m1 = enc.encode(["a photo of a cat"])
    assert m1.all()
    torch.testing.assert_close(alone[0], ref, atol=1e-5, rtol=1e-5)

    batch = CAPTIONS + [LONG]
    tokens, mask = enc.encode(batch)
    expected = enc.tokenize(batch)["attention_mask"].bool()
    assert tokens.shape == (5, 16, 32) and tokens.dtype == torch.float32
    assert torch.equal(mask, expected) and mask[4].all()
    assert torch.all(tokens[~mask] == 0) and torch.isfinite(tokens).all()
    for i in (0, 2):  # short captions next to a truncated long one: padding does not leak in
        single, ms = enc.encode([batch[i]])
        n = int(ms.sum())
        torch.testing.assert_close(tokens[i, :n], single[0, :n], atol=1e-5, rtol=1e-5)


def test_hf_encoder_hidden_state_choice(tiny_folders):
    folder, _ = tiny_folders["llama"]
    last = HFTextEncoder(folder, hidden_state="last")
    penult = HFTextEncoder(folder, hidden_state=-2)
    emb = HFTextEncoder(folder, hidden_state=0)
    a, ma = last.encode(CAPTIONS)
    b, mb = penult.encode(CAPTIONS)
    assert torch.equal(ma, mb) and a.shape == b.shape
    assert (a - b)[ma].abs().max() > 1e-3
    ids = last.tokenize(CAPTIONS)
    with torch.no_grad():
        hs = last.model(**ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(b, hs[-2].masked_fill(~mb[..., None], 0))
    torch.testing.assert_close(emb.encode(CAPTIONS)[0], hs[0].masked_fill(~mb[..., None], 0))
    with pytest.raises(ValueError, match="out of range"):
        HFTextEncoder(folder, hidden_state=7)
    with pytest.raises(ValueError, match="hidden_state"):
        HFTextEncoder(folder, hidden_state="penultimate")


def test_hf_encoder_clip_max_length_capped(tiny_folders):
    enc = HFTextEncoder(tiny_folders["clip"][0], max_length=200)
    assert enc.max_length == 77
    assert enc.encode([LONG * 3])[0].shape == (1, 77, 32)


def test_hf_encoder_dtype(tiny_folders):
    enc = HFTextEncoder(tiny_folders["bert"][0], dtype=torch.bfloat16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    t16, m = enc.encode(CAPTIONS)
    t32, _ = HFTextEncoder(tiny_folders["bert"][0]).encode(CAPTIONS)
    assert t16.dtype == torch.float32  # outputs always float32
    assert (t16 - t32)[m].abs().max() < 0.1


# ------------------------------------------------------------------------------------------ errors
def test_errors(tmp_path, tiny_folders):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(FileNotFoundError, match="no_such_encoder.*config.json"):
        HFTextEncoder(missing)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a transformers model folder"):
        HFTextEncoder(junk)
    enc = HFTextEncoder(tiny_folders["bert"][0])
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(TypeError, match=r"captions\[1\] is int"):
        enc.encode(["a cat", 3])
    with pytest.raises(TypeError, match="single str"):
        enc.encode("a cat")
    with pytest.raises(ValueError, match="max_length"):
        HFTextEncoder(tiny_folders["bert"][0], max_length=0)
    cached = CachedTextEncoder(enc)
    with pytest.raises(ValueError, match="empty"):
        cached.encode([])
    with pytest.raises(TypeError):
        cached.precompute([None])


# ---------------------------------------------------------------------------------- conditioning
def _features(B, L, dim, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, L, dim, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return tokens * mask[..., None], mask


def test_conditioning_drop_semantics_and_concat_order():
    torch.manual_seed(0)
    cond = TextConditioning([8, 12], out_dim=16, drop_probs=[0.3, 0.6])
    f0 = _features(3, 5, 8, [5, 2, 3], 1)
    f1 = _features(3, 4, 12, [1, 4, 2], 2)
    drop = [torch.tensor([False, True, False]), torch.tensor([True, False, False])]
    tokens, mask = cond([f0, f1], drop=drop)
    assert tokens.shape == (3, 9, 16) and mask.shape == (3, 9)
    for i, ((x, m), lo, hi) in enumerate([(f0, 0, 5), (f1, 5, 9)]):
        proj_null = cond.proj[i](cond.null_embeddings[i])[0]
        for b in range(3):
            t, mk = tokens[b, lo:hi], mask[b, lo:hi]
            if drop[i][b]:
                torch.testing.assert_close(t[0], proj_null)
                assert mk.tolist() == [True] + [False] * (hi - lo - 1)
                assert torch.all(t[1:] == 0)
            else:
                assert torch.equal(mk, m[b])
                torch.testing.assert_close(t[mk], cond.proj[i](x[b][m[b]]))
                assert torch.all(t[~mk] == 0)
    # eval mode with explicit drops still applies them; without, never drops
    cond.eval()
    assert torch.equal(cond([f0, f1], drop=drop)[1], mask)
    t_eval, m_eval = cond([f0, f1])
    t_keep, _m_keep = cond([f0, f1], drop=[torch.zeros(3, dtype=torch.bool)] * 2)
    assert torch.equal(t_eval, t_keep) and torch.equal(m_eval, torch.cat([f0[1], f1[1]], 1))


def test_conditioning_independent_random_drops():
    cond = TextConditioning([4, 4], out_dim=8, drop_probs=0.5).train()
    B = 4000
    f = _features(B, 2, 4, [2] * B, 0)
    torch.manual_seed(123)
    tokens, mask = cond([f, f])
    d0 = ~mask[:, 1]  # a dropped encoder keeps only its first (null) position
    d1 = ~mask[:, 3]
    assert abs(d0.float().mean() - 0.5) < 0.03 and abs(d1.float().mean() - 0.5) < 0.03
    assert abs((d0 & d1).float().mean() - 0.25) < 0.03
    torch.manual_seed(123)  # reproducible with a seed
    assert torch.equal(cond([f, f])[0], tokens)
    # eval: never drops, whatever the probabilities
    cond_all = TextConditioning([4], out_dim=8, drop_probs=1.0).eval()
    assert cond_all([f])[1].all()
    assert not cond_all.train()([f])[1][:, 1].any()


def test_conditioning_joint_drop_all():
    """drop_all_prob (issue 21 §1, SD3's joint drop): the all-null rate is 1 - (1 - pa)(1 - p0 p1), each
    encoder's own rate 1 - (1 - pa)(1 - p_i); with pa = 0 the draws are exactly the independent ones."""
    B = 40_000
    g = torch.Generator().manual_seed(5)
    joint = TextConditioning([4, 4], out_dim=8, drop_probs=[0.1, 0.2], drop_all_prob=0.1)
    d0, d1 = joint.sample_drops(B, generator=g)
    assert abs((d0 & d1).float().mean() - (1 - 0.9 * (1 - 0.02))) < 0.006    # 0.118, not 0.02
    assert abs(d0.float().mean() - (1 - 0.9 * 0.9)) < 0.008
    assert abs(d1.float().mean() - (1 - 0.9 * 0.8)) < 0.008
    plain = TextConditioning([4, 4], out_dim=8, drop_probs=[0.1, 0.2])
    a = plain.sample_drops(B, generator=torch.Generator().manual_seed(5))
    assert abs((a[0] & a[1]).float().mean() - 0.02) < 0.004
    torch.manual_seed(9)
    b = plain.sample_drops(B)   # the global RNG, same numbers as before drop_all_prob existed
    torch.manual_seed(9)
    assert torch.equal(b[0], torch.rand(B) < 0.1) and torch.equal(b[1], torch.rand(B) < 0.2)
    # the joint drop reaches forward in training mode
    f = _features(B, 2, 4, [2] * B, 0)
    _, mask = joint.train()([f, f])
    assert abs((~mask[:, 1] & ~mask[:, 3]).float().mean() - 0.118) < 0.006
    with pytest.raises(ValueError, match="drop_all_prob"):
        TextConditioning([4], out_dim=8, drop_all_prob=1.5)


def test_conditioning_gradients():
    cond = TextConditioning([8, 12], out_dim=16).train()
    f0, f1 = _features(4, 3, 8, [3, 1, 2, 3], 1), _features(4, 2, 12, [2, 2, 1, 1], 2)
    drop = [torch.tensor([True, False, False, True]), torch.tensor([False, True, False, False])]
    tokens, _mask = cond([f0, f1], drop=drop)
    (tokens ** 2).sum().backward()
    for p in list(cond.null_embeddings) + [q for m in cond.proj for q in m.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert sum(p.numel() for p in cond.parameters()) == 8 * 16 + 16 + 12 * 16 + 16 + 8 + 12


def test_conditioning_identity_null_and_edge_cases():
    one = TextConditioning([32], out_dim=32)
    assert isinstance(one.proj[0], torch.nn.Identity)
    assert isinstance(TextConditioning([32], out_dim=16).proj[0], torch.nn.Linear)
    assert all(isinstance(p, torch.nn.Linear) for p in TextConditioning([32, 32], out_dim=32).proj)
    cond = TextConditioning([8, 12], out_dim=16, null_length=3).eval()
    f0, f1 = _features(2, 5, 8, [5, 2], 1), _features(2, 2, 12, [1, 0], 2)  # sample 1: encoder 1 empty
    tokens, mask = cond([f0, f1])
    assert tokens.shape == (2, 5 + 3, 16)  # encoder 1 padded to null_length
    assert mask[1, 5:].tolist() == [True] * 3  # an empty encoder output is replaced by its null
    assert mask.any(1).all()
    # null(): default length, and == forward with every drop True when given the lengths
    n_tokens, n_mask = cond.null(2)
    assert n_tokens.shape == (2, 6, 16) and n_mask.all()
    all_drop = [torch.ones(2, dtype=torch.bool)] * 2
    ft, fm = cond([f0, f1], drop=all_drop)
    nt, nm = cond.null(2, lengths=[5, 2])
    assert torch.equal(ft, nt) and torch.equal(fm, nm)
    torch.testing.assert_close(ft[fm].view(2, 6, 16), n_tokens)
    with pytest.raises(ValueError):
        TextConditioning([8], out_dim=8, null_length=0)
    with pytest.raises(ValueError):
        cond([f0])


def test_conditioning_feeds_the_denoiser():
    """Output plugs into ThreeStageDiT; the short null() and the padded all-drop condition give the same
    prediction (padded text positions are masked out of cross-attention)."""
    from helpers.builders import nano, perturb_

    from snapgen.models import ThreeStageDiT
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(nano())).eval()
    cond = TextConditioning([384], out_dim=model.config.text_dim)
    f = _features(2, 7, 384, [7, 3], 0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        text, text_mask = cond([f])
        v = model(x, t, {"text": text, "text_mask": text_mask})
        u_short = model(x, t, *cond.null(2))
        u_padded = model(x, t, *cond.null(2, lengths=[7]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    torch.testing.assert_close(u_short, u_padded, atol=1e-5, rtol=1e-5)
    assert (u_short - v).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ cache
class FakeEncoder(TextEncoder):
    """Deterministic features from the caption's characters; counts the captions it encodes."""

    def __init__(self, dim=6, name="fake"):
        super().__init__()
        self.dim, self.max_length, self.name = dim, 8, name
        self.seen = []

    def _encode(self, captions):
        self.seen.extend(captions)
        lengths = [min(len(c.split()) + 1, self.max_length) for c in captions]
        L = max(lengths)
        tokens = torch.zeros(len(captions), L, self.dim)
        for b, c in enumerate(captions):
            g = torch.Generator().manual_seed(sum(map(ord, c)) * 7919 + len(c))
            tokens[b, :lengths[b]] = torch.randn(lengths[b], self.dim, generator=g) * 3
        return tokens, torch.arange(L)[None] < torch.tensor(lengths)[:, None]


def test_cache_only_new_captions_hit_the_encoder():
    fake = FakeEncoder()
    cached = CachedTextEncoder(fake, dtype=torch.float32)
    assert cached.dim == 6 and cached.name == "fake" and cached.max_length == 8
    t1, m1 = cached.encode(["a b", "c", "a b"])
    assert fake.seen == ["a b", "c"]  # duplicates encoded once
    ref, ref_m = fake.encode(["a b", "c", "a b"])
    assert torch.equal(t1, ref) and torch.equal(m1, ref_m)
    fake.seen.clear()
    t2, m2 = cached.encode(["c", "d e f", "a b"])
    assert fake.seen == ["d e f"]
    ref, ref_m = fake.encode(["c", "d e f", "a b"])
    assert torch.equal(t2, ref) and torch.equal(m2, ref_m)
    fake.seen.clear()
    assert cached.precompute(["x y", "c", "x y", "z"], batch_size=1, progress=False) == 2
    assert fake.seen == ["x y", "z"] and len(cached) == 5 and "z" in cached


def test_cache_fp16_rounding_and_float32_output():
    fake = FakeEncoder()
    cached = CachedTextEncoder(fake)  # float16 storage
    tokens, _mask = cached.encode(["one two three", "four"])
    ref, _ = fake.encode(["one two three", "four"])
    assert tokens.dtype == torch.float32 and cached._cache["four"].dtype == torch.float16
    assert not torch.equal(tokens, ref)  # really rounded ...
    assert torch.all((tokens - ref).abs() <= ref.abs() * 2 ** -11 + 1e-7)  # ... by at most half an fp16 ulp


def test_cache_minilm_matches_uncached(minilm):
    """Cached features were computed in other batches (one caption at a time): equal to a batch encode
    within the padding noise (fp32) or fp16 rounding (fp16)."""
    ref, ref_m = minilm.encode(CAPTIONS)
    c32 = CachedTextEncoder(minilm, dtype=torch.float32)
    c32.precompute(CAPTIONS, batch_size=1, progress=False)
    t, m = c32.encode(CAPTIONS)
    assert torch.equal(m, ref_m)
    torch.testing.assert_close(t, ref, atol=1e-5, rtol=0)
    c16 = CachedTextEncoder(minilm)
    t, m = c16.encode(CAPTIONS)
    assert torch.equal(m, ref_m)
    assert torch.all((t - ref).abs() <= ref.abs() * 2 ** -11 + 1e-5)


def test_cache_save_load_round_trip(tmp_path):
    captions = ["a b", "ünïcödé caption 🐱", 'quotes " and \\ backslash', "c d e f g h i j k"]
    fake = FakeEncoder()
    cached = CachedTextEncoder(fake)
    before = cached.encode(captions)
    path = cached.save(tmp_path / "sub" / "cache.safetensors")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["cache.safetensors"]

    fake2 = FakeEncoder()
    loaded = CachedTextEncoder(fake2).load(path)
    assert len(loaded) == 4
    after = loaded.encode(captions)
    assert fake2.seen == []  # everything came from the file
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # an empty cache round-trips too
    CachedTextEncoder(FakeEncoder()).save(tmp_path / "empty.safetensors")
    assert len(CachedTextEncoder(FakeEncoder()).load(tmp_path / "empty.safetensors")) == 0
    # written for another encoder
    with pytest.raises(ValueError, match="written for encoder 'fake'"):
        CachedTextEncoder(FakeEncoder(name="other")).load(path)
    with pytest.raises(ValueError, match="dim"):
        CachedTextEncoder(FakeEncoder(dim=5, name="fake")).load(path)
    assert len(CachedTextEncoder(FakeEncoder(name="other")).load(path, strict=False)) == 4
    with pytest.raises(FileNotFoundError):
        loaded.load(tmp_path / "nope.safetensors")
