"""Landmark NME from part centroids: exact linear landmarks give 0, noisy ones the hand-computed error."""

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler

from part_distillation.evaluation import build_evaluator, keypoint_nme
from part_distillation.evaluation.keypoint_nme import (
    KeypointNMEEvaluator,
    fill_missing,
    fit_landmark_regressor,
    part_centroids,
    predict_landmarks,
)
from part_distillation.utils.errors import ConfigError

from conftest import register_records

CELEBA_NAMES = ["left eye", "right eye", "nose", "left mouth", "right mouth"]
S = 40  # frame size (pixels)
K, L = 4, 5
BLOCK = 6


@pytest.fixture(autouse=True)
def _clear_fit_store():
    keypoint_nme.FIT_DATA.clear()
    yield
    keypoint_nme.FIT_DATA.clear()


def _synthetic(rng, n, transform, noise=0.0, scale=1):
    """Images with K square parts (one per quadrant); landmarks = affine function of the part centroids.

    Returns per image (part_seg at S/scale px, keypoints K×3 in frame pixels, exact centroids [K, 2]).
    """
    size = S // scale
    half = size // 2
    block = BLOCK // scale
    data = []
    for _ in range(n):
        seg = torch.zeros(size, size, dtype=torch.long)
        cents = np.zeros((K, 2))
        for k in range(K):
            oy, ox = divmod(k, 2)
            y0 = oy * half + int(rng.integers(0, half - block + 1))
            x0 = ox * half + int(rng.integers(0, half - block + 1))
            seg[y0 : y0 + block, x0 : x0 + block] = k + 1
            cents[k] = [(x0 + block / 2) / size, (y0 + block / 2) / size]
        lm = (transform[0] @ cents.ravel() + transform[1]).reshape(L, 2)  # normalised
        kps = np.concatenate([lm * S + noise * rng.standard_normal((L, 2)), np.ones((L, 1))], axis=1)
        data.append((seg, kps, cents))
    return data


def _transform(rng):
    return 0.3 * rng.standard_normal((2 * L, 2 * K)), rng.uniform(0.3, 0.7, 2 * L)


def _evaluate(name, data, **kwargs):
    ev = KeypointNMEEvaluator(name, distributed=False, **kwargs)
    ev.reset()
    for i, (seg, kps, _) in enumerate(data):
        inp = {"image_id": i, "keypoints": torch.from_numpy(kps), "height": S, "width": S}
        ev.process([inp], [{"part_seg": seg}])
    return ev.evaluate()["part_landmark_nme"]


def test_centroids_hard_and_soft():
    rng = np.random.default_rng(0)
    ((seg, _, cents),) = _synthetic(rng, 1, _transform(rng))
    hard, present = part_centroids(seg)
    assert present.all() and np.allclose(hard, cents)
    probs = torch.nn.functional.one_hot(seg, K + 1).permute(2, 0, 1).float()
    soft, _ = part_centroids(part_probs=probs)
    assert np.allclose(soft, cents)
    missing, present = part_centroids(seg.masked_fill(seg == 2, 0), num_parts=K + 1)
    assert present.tolist() == [True, False, True, True, False] and np.isnan(missing[1]).all()


def test_exact_linear_landmarks_give_zero_nme():
    rng = np.random.default_rng(1)
    name = register_records("nme_exact", keypoint_names=CELEBA_NAMES)
    res = _evaluate(name, _synthetic(rng, 30, _transform(rng)), fit_on_same_split=True)
    assert res["NME"] == pytest.approx(0.0, abs=1e-6)
    assert res["fit_on_same_split"] == 1 and res["num_parts"] == K


def test_noisy_landmarks_fit_on_train_split(tmp_path):
    """Clean train split → the true map; test landmarks + noise → NME = mean ‖noise‖ / inter-ocular (%)."""
    rng = np.random.default_rng(2)
    transform = _transform(rng)
    train = register_records("nme_train", keypoint_names=CELEBA_NAMES)
    test = register_records("nme_test", keypoint_names=CELEBA_NAMES)
    train_data = _synthetic(rng, 40, transform)
    test_data = _synthetic(rng, 25, transform, noise=1.5)
    out = tmp_path / "inference"
    fit_res = _evaluate(train, train_data, fit_dataset=train, output_dir=str(out / train))
    assert fit_res["NME"] == pytest.approx(0.0, abs=1e-6)
    expected = []
    for _, kps, cents in test_data:
        clean = (transform[0] @ cents.ravel() + transform[1]).reshape(L, 2) * S
        expected.append(np.linalg.norm(kps[:, :2] - clean, axis=1) / np.linalg.norm(kps[0, :2] - kps[1, :2]))
    res = _evaluate(test, test_data, fit_dataset=train, output_dir=str(out / test))
    assert res["NME"] == pytest.approx(100 * np.mean(expected), rel=1e-6)
    assert res["NME-left eye"] == pytest.approx(100 * np.mean([e[0] for e in expected]), rel=1e-6)
    assert res["fit_on_same_split"] == 0 and res["num_fit_images"] == 40
    # a later run finds the fit split's centroids next to its own output folder
    keypoint_nme.FIT_DATA.clear()
    again = _evaluate(test, test_data, fit_dataset=train, output_dir=str(out / test))
    assert again["NME"] == pytest.approx(res["NME"])


def test_missing_fit_split_is_an_error():
    name = register_records("nme_nofit", keypoint_names=CELEBA_NAMES)
    rng = np.random.default_rng(3)
    with pytest.raises(ConfigError, match="nme_never_evaluated"):
        _evaluate(name, _synthetic(rng, 3, _transform(rng)), fit_dataset="nme_never_evaluated")
    with pytest.raises(ConfigError, match="FIT_ON_SAME_SPLIT"):
        KeypointNMEEvaluator(name, distributed=False)


def test_regressor_equals_sklearn_per_landmark():
    """StandardScaler + LinearRegression(fit_intercept=False) per landmark on its visible rows (protocol A)."""
    rng = np.random.default_rng(4)
    x = rng.random((50, 8))
    y = rng.random((50, 3, 2))
    vis = rng.random((50, 3)) < 0.8
    x_test = rng.random((7, 8))
    ours = predict_landmarks(fit_landmark_regressor(x, y, vis), x_test)
    for lm in range(3):
        sx, sy = StandardScaler().fit(x[vis[:, lm]]), StandardScaler().fit(y[vis[:, lm], lm])
        reg = LinearRegression(fit_intercept=False).fit(sx.transform(x[vis[:, lm]]), sy.transform(y[vis[:, lm], lm]))
        assert np.allclose(ours[:, lm], sy.inverse_transform(reg.predict(sx.transform(x_test))))


def test_missing_parts_filled_with_fit_mean():
    cents = np.array([[[0.1, 0.2], [np.nan, np.nan]], [[0.3, 0.4], [0.5, 0.6]], [[np.nan, np.nan], [0.7, 0.8]]])
    fill = keypoint_nme._missing_fill_values(cents, "mean")
    assert np.allclose(fill, [[0.2, 0.3], [0.6, 0.7]])
    assert np.allclose(fill_missing(cents, fill)[0, 1], [0.6, 0.7])
    assert np.allclose(keypoint_nme._missing_fill_values(cents, "center"), 0.5)


def test_missing_parts_in_evaluation_stay_finite():
    rng = np.random.default_rng(5)
    name = register_records("nme_missing", keypoint_names=CELEBA_NAMES)
    data = _synthetic(rng, 30, _transform(rng))
    data[3] = (data[3][0].masked_fill(data[3][0] == 4, 0), data[3][1], data[3][2])  # part 4 absent
    res = _evaluate(name, data, fit_on_same_split=True, missing_fill="mean")
    assert np.isfinite(res["NME"]) and res["num_parts"] == K


@pytest.mark.parametrize("via_mapper", [False, True])
def test_bbox_normaliser_per_axis(via_mapper):
    """CUB-style: error x / box width, y / box height; record keypoints (original px) or mapper ones (½ scale)."""
    rng = np.random.default_rng(6)
    transform = _transform(rng)
    clean_data, noisy_data = _synthetic(rng, 30, transform), _synthetic(rng, 10, transform, noise=2.0)
    boxes = rng.uniform(10, 30, (10, 2))
    names = [f"kp{i}" for i in range(L)]
    train = register_records("nme_bbox_train", keypoint_names=names)
    records = [
        {
            "image_id": i,
            "height": S,
            "width": S,
            "bbox": [3.0, 4.0, *boxes[i]],
            "bbox_mode": BoxMode.XYWH_ABS,
            "keypoints": kps.tolist(),
        }
        for i, (_, kps, _) in enumerate(noisy_data)
    ]
    test = register_records("nme_bbox_test", records, keypoint_names=names)
    _evaluate(train, clean_data, fit_dataset=train)
    ev = KeypointNMEEvaluator(test, fit_dataset=train, distributed=False)
    ev.reset()
    for i, (seg, kps, _) in enumerate(noisy_data):
        inp = {"image_id": i}
        if via_mapper:  # the mapper halved the image: keypoints and box scaled by 0.5
            half = kps.copy()
            half[:, :2] *= 0.5
            inp.update(
                keypoints=torch.from_numpy(half),
                height=S // 2,
                width=S // 2,
                transform=torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]),
            )
        ev.process([inp], [{"part_seg": seg}])
    assert ev.normalizer == "bbox"
    res = ev.evaluate()["part_landmark_nme"]
    expected = []
    for i, (_, kps, cents) in enumerate(noisy_data):
        clean = (transform[0] @ cents.ravel() + transform[1]).reshape(L, 2) * S
        expected.append(np.linalg.norm((kps[:, :2] - clean) / boxes[i], axis=1))
    assert res["NME"] == pytest.approx(100 * np.mean(expected), rel=1e-6)


def test_registered_type_builds():
    from part_distillation.engine import load_cfg

    name = register_records("nme_build", keypoint_names=CELEBA_NAMES)
    cfg = load_cfg("")
    cfg.defrost()
    cfg.TEST.EVALUATOR_TYPE = "part_landmark_nme"
    cfg.TEST.LANDMARK_NME.FIT_DATASET = "mafl_train"
    ev = build_evaluator(cfg, name, "/tmp/unused")
    assert isinstance(ev, KeypointNMEEvaluator) and ev.fit_dataset == "mafl_train" and ev.normalizer == "inter_ocular"
    cfg.TEST.LANDMARK_NME.FIT_DATASET = ""
    with pytest.raises(ConfigError):
        build_evaluator(cfg, name, "/tmp/unused")
