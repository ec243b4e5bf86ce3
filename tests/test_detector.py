"""The scene detector can say no (issue 20 §1): the reject class, the noise guard, calibration, the
counting threshold, the negatives generator and the detector card. (Real-render ceiling and the
shuffled-caption floor: tests/test_sceneeval.py.)"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from snapgen.data.scenes import COLORS, SHAPES, _draw_shape
from snapgen.eval import detector as detmod
from snapgen.eval.detector import REJECT, SceneDetector, load_detector, load_detector_card
from snapgen.eval.detector_eval import evaluate_negatives, expected_calibration_error
from snapgen.eval.detector_train import calibration_report, fit_temperature
from snapgen.eval.negatives import (
    HELDOUT_TYPES,
    NEGATIVE_TYPES,
    TRAIN_TYPES,
    negative_image,
    noise_image,
    shape_likeness,
)
from snapgen.eval.sceneeval import COUNTING_CONFIDENCE, MIN_CONFIDENCE, score_image, validate_metadata
from snapgen.eval.sceneeval import DetectedObject as SceneDetectedObject


@pytest.fixture(scope="module")
def detector():
    return load_detector()


def _canvas():
    c = Image.new("RGB", (256, 256), (250, 247, 235))
    return c, ImageDraw.Draw(c)


def _probes():
    """The issue's probes: a red ellipse, a random blue 7-gon, a cross of two red bars."""
    c, d = _canvas()
    d.ellipse((60, 100, 200, 170), fill=COLORS["red"])
    ellipse = c.resize((64, 64), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(1)
    ang, r = np.sort(rng.uniform(0, 2 * np.pi, 7)), rng.uniform(0.4, 1, 7)
    c, d = _canvas()
    d.polygon([(128 + 80 * ri * np.cos(a), 128 + 80 * ri * np.sin(a)) for a, ri in zip(ang, r)], fill=COLORS["blue"])
    polygon = c.resize((64, 64), Image.Resampling.LANCZOS)
    c, d = _canvas()
    d.rectangle((60, 112, 196, 144), fill=COLORS["red"])
    d.rectangle((112, 60, 144, 196), fill=COLORS["red"])
    cross = c.resize((64, 64), Image.Resampling.LANCZOS)
    return {"ellipse": ellipse, "7-gon": polygon, "cross": cross}


def test_issue_probes_are_not_shapes(detector):
    for name, im in _probes().items():
        dets = [d for d in detector.detect(im) if d.confidence >= MIN_CONFIDENCE]
        assert dets == [], (name, dets)


@pytest.mark.parametrize("std", [20.0, 40.0, 60.0])
def test_pure_noise_has_no_objects(detector, std):
    for i in range(8):
        assert detector.detect(noise_image(i, std)) == [], (std, i)


def test_heldout_negatives_false_objects(detector):
    """Negatives of the held-out stream (own seeds, plus types never trained on): <= 0.02 false objects
    per image at the detection threshold, and the real shapes among them are still found."""
    r = evaluate_negatives(detector, n=100, stream="heldout")
    assert r["false_per_image"] <= 0.02, r   # goal 0.02; shipped: 0.007 on 300 (card)
    assert r["shape_recall"] >= 0.95, r
    only_new = evaluate_negatives(detector, n=50, stream="heldout", types=HELDOUT_TYPES)
    assert only_new["false_per_image"] <= 0.04, only_new


def test_negatives_streams_and_types_are_separate():
    assert not set(TRAIN_TYPES) & set(HELDOUT_TYPES)
    assert set(NEGATIVE_TYPES) == set(TRAIN_TYPES) | set(HELDOUT_TYPES)
    a, b = negative_image(3, stream="train"), negative_image(3, stream="heldout")
    assert np.asarray(a.image).tobytes() != np.asarray(b.image).tobytes()
    again = negative_image(3, stream="train")
    assert np.asarray(a.image).tobytes() == np.asarray(again.image).tobytes()   # deterministic
    assert all(n["type"] in TRAIN_TYPES for i in range(30) for n in negative_image(i, stream="calib").negatives)
    seen = {n["type"] for i in range(60) for n in negative_image(i, stream="heldout").negatives}
    assert seen & set(HELDOUT_TYPES) and seen & set(TRAIN_TYPES)
    with pytest.raises(ValueError, match="unknown stream"):
        negative_image(0, stream="test")


def test_shape_likeness():
    for shape in SHAPES:
        im = Image.new("L", (80, 80), 0)
        _draw_shape(ImageDraw.Draw(im), shape, (10, 10, 70, 70), 255)
        assert shape_likeness(np.asarray(im) > 127) > 0.95, shape
    bar = np.zeros((80, 80), bool)
    bar[35:45, 10:70] = True
    assert shape_likeness(bar) < 0.5


def test_reject_class_and_untrained_detector():
    det = load_detector()
    assert det.config.reject and det.config.classes == SHAPES + (REJECT,)
    assert det.net.head[-1].out_features == len(SHAPES) + 1
    fresh = SceneDetector()   # untrained: never rejects (the reject bias starts at -4)
    assert fresh.net.head[-1].bias[-1].item() == -4.0


def test_calibration_lowers_ece(detector):
    r = calibration_report(detector, n=80)
    assert r["temperature"] != 1.0
    assert r["ece_after"] < r["ece_before"], r
    assert r["nll_after"] <= r["nll_before"], r


def test_fit_temperature_and_ece():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(4000, 4, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]   # calibrated at T = 1
    t = fit_temperature(logits * 3, labels)   # over-confident by 3x: T close to 3
    assert 2.5 < t < 3.5
    p_bad, p_good = torch.softmax(logits * 3, -1), torch.softmax(logits * 3 / t, -1)
    assert expected_calibration_error(p_good, labels) < 0.02 < expected_calibration_error(p_bad, labels)


def _obj(shape, cx, conf):
    return SceneDetectedObject(shape, "red", (cx - 5, 25, cx + 5, 35), (cx, 30), 100.0, conf)


def test_counting_uses_genevals_counting_threshold():
    assert COUNTING_CONFIDENCE == 0.9 and MIN_CONFIDENCE == 0.3
    counting = validate_metadata({"tag": "counting", "include": [{"class": "star", "count": 2}],
                                  "exclude": [{"class": "star", "count": 3}], "prompt": "two stars"})
    single = validate_metadata({"tag": "single_object", "include": [{"class": "star", "count": 1}],
                                "prompt": "a star"})
    weak = [_obj("star", 15, 0.5), _obj("star", 45, 0.5)]
    assert not score_image(weak, counting)           # 0.5 < 0.9: not counted
    assert score_image(weak, single)                 # 0.5 >= 0.3: counted
    assert score_image([_obj("star", 15, 0.95), _obj("star", 45, 0.92)], counting)
    # a third, weak star is ignored for counting (GenEval filters all detections below 0.9)
    assert score_image([_obj("star", 15, 0.95), _obj("star", 45, 0.92), _obj("star", 30, 0.6)], counting)
    assert score_image(weak, counting, counting_confidence=0.4)


def test_detector_card():
    card = load_detector_card()
    assert card == load_detector_card(detmod.default_detector_dir() / "card.json")
    assert card["thresholds"] == {"detection": 0.3, "counting": 0.9}
    assert card["real_renders"]["shape_accuracy_overall"] >= 0.98
    assert card["negatives_heldout"]["clean"]["false_per_image"] <= 0.02   # goal 0.02 (shipped 0.007)
    assert card["negatives_heldout"]["random"]["false_per_image"] <= 0.06   # goal 0.02 (shipped 0.050)
    assert all(v == 0 for v in card["pure_noise"].values())
    assert card["calibration"]["ece_after"] < card["calibration"]["ece_before"]
    assert "python -m snapgen.eval.detector" in card["command"]


def test_detector_card_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="--eval-only"):
        load_detector_card(tmp_path)


def test_public_names_still_importable():
    for name in ("DEGRADATIONS", "DEGRADED", "DetectedObject", "DetectorConfig", "SceneDetector", "ShapeNet",
                 "accuracy_report", "default_detector_dir", "degrade_image", "evaluate_detector",
                 "evaluate_touching", "load_detector", "train_detector", "evaluate_negatives", "evaluate_noise"):
        assert getattr(detmod, name) is not None, name
    assert SceneDetectedObject is detmod.DetectedObject


def test_noise_guard_alone_finds_no_candidates():
    """The segmentation guard by itself (an untrained classifier): no candidate region in pure noise,
    while a render with noise std 16 keeps all its objects."""
    from snapgen.data.scenes import SceneDataset
    from snapgen.eval.degrade import degrade_image

    det = SceneDetector()
    for std in (40.0, 80.0):
        assert sum(len(det.regions(noise_image(i, std))) for i in range(10)) == 0, std
    ds, rng = SceneDataset(64, split="val", seed=3), np.random.default_rng(0)
    for i in range(10):
        s = ds[i]
        im = degrade_image(s.image, rng, blur=1.0, noise=16.0, jpeg=0, jitter=0.0, resample=1.0)
        assert len(det.regions(im)) == len(s.meta["objects"]), s.caption


def test_crop_channels_and_outside_marking():
    """The classifier's inputs (config.inputs): the soft mask, and 'outside' = 1 exactly where the crop
    square lies beyond the image (how a shape cut off by the border shows its cut)."""
    det = SceneDetector()
    assert det.config.inputs[0] == "mask" and det.net.features[0].in_channels == len(det.config.inputs)
    soft = np.zeros((64, 64))
    soft[50:64, 20:34] = 1.0                      # a square running off the bottom edge
    x = det.crop(soft, (20.0, 50.0, 34.0, 64.0))
    assert x.shape == (len(det.config.inputs), det.config.crop_size, det.config.crop_size)
    out = x[det.config.inputs.index("outside")]
    assert out[-1].min() == 1.0 and out[0].max() == 0.0    # bottom rows beyond the image, top rows inside
    inner = det.crop(soft, (20.0, 40.0, 34.0, 54.0))
    assert inner[det.config.inputs.index("outside")].max() == 0.0
    with pytest.raises(ValueError, match="inputs must start with 'mask'"):
        detmod.DetectorConfig(inputs=("outside",))


def test_cut_off_shapes_are_not_objects(detector):
    """Scene shapes 35-65 % outside the image (cut by the border): not counted as (smaller) shapes."""
    found = 0
    for i, shape in enumerate(SHAPES * 2):
        c, d = _canvas()
        x = 40 + 30 * i % 150
        _draw_shape(d, shape, (x, 256 - 40 - i % 3 * 8, x + 96, 256 + 56 - i % 3 * 8), COLORS["blue"])
        found += sum(o.confidence >= MIN_CONFIDENCE for o in detector.detect(c.resize((64, 64), Image.Resampling.LANCZOS)))
    assert found <= 1, found


def test_generator_texture_squares_are_kept(detector):
    """Real renders through the shipped VAE with latent noise 0.2 (the blotchy texture of the shipped
    generator's objects, ``benchmarks/detector_latent_noise.py``) still score. Shipped detector: 0.959 on
    these 48 (0.928 on 300); a detector trained with ``--vae-p 0.35`` gave the same 0.959 here (0.952 on 300)."""
    from snapgen.data.scenes import SceneDataset
    from snapgen.eval.sceneeval import evaluate_images, metadata_from_scene, summarize
    from snapgen.eval.vae_texture import latent_noise_images, shipped_autoencoder

    samples = [SceneDataset(64, seed=0, split="val").generate(i) for i in range(48)]
    images = latent_noise_images(shipped_autoencoder(), [s.image for s in samples], [0.2] * len(samples),
                                 torch.Generator().manual_seed(0))
    score = summarize(evaluate_images(images, [metadata_from_scene(s) for s in samples], detector))["overall"]
    assert score >= 0.92, score  # shipped detector: 0.959 on these 48 (0.928 on 300)
