"""tools/visualize_data.py and the TensorBoard prediction pictures (PredictionImagesHook)."""

import os

import cv2
import numpy as np

from part_distillation.engine import Trainer


def test_visualize_registered_dataset_and_store(datasets_root, tmp_path, repo_script):
    from part_distillation.data.pseudo_labels import PseudoLabelWriter, make_object, make_part

    tool = repo_script("tools/visualize_data.py")
    written = tool.main(["--dataset", "toyparts_parts_val", "--output-dir", str(tmp_path / "gt"), "--num", "2"])
    assert len(written) == 2
    for path in written:
        picture = cv2.imread(path)
        assert picture is not None and picture.shape[:2] == (128, 128) and picture.std() > 5
    # a store: parts drawn by detectron2's Visualizer (class ids beyond the metadata's names are fine)
    image = np.full((64, 80, 3), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    obj = np.zeros((64, 80), bool)
    obj[10:50, 10:70] = True
    part = obj.copy()
    part[:, 40:] = False
    writer = PseudoLabelWriter(str(tmp_path / "store"), "mine", "ranking", shard_size=4, num_images=1)
    writer.add(
        0,
        {
            "image_id": 0,
            "file_name": str(tmp_path / "a.png"),
            "height": 64,
            "width": 80,
            "objects": [make_object(obj, [make_part(part, 1.0, 5)], 1.0, 2)],
        },
    )
    writer.close()
    writer.finalize()
    (path,) = tool.main(["--store", str(tmp_path / "store"), "mine", "ranking", "--output-dir", str(tmp_path / "st")])
    picture = cv2.imread(path).astype(int)
    inside, outside = picture[20:40, 15:35], picture[20:40, 45:65]
    assert np.abs(inside - 90).mean() > 10  # the part is coloured
    assert np.abs(outside - 90).mean() < 3  # the rest of the object is not (outline aside)


def test_prediction_images_in_tensorboard(quick_cfg):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    cfg = quick_cfg(max_iter=4, extra=["TEST.EVAL_PERIOD", "2", "VIS.NUM_PREDICTION_IMAGES", "2"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    (events,) = [f for f in os.listdir(cfg.OUTPUT_DIR) if f.startswith("events.out.tfevents")]
    acc = EventAccumulator(os.path.join(cfg.OUTPUT_DIR, events), size_guidance={IMAGES: 0}).Reload()
    tags = sorted(acc.Tags()["images"])
    assert tags == ["predictions/toyparts_val/0", "predictions/toyparts_val/1"]
    for tag in tags:
        steps = [e.step for e in acc.Images(tag)]
        assert steps == [1, 4]  # after the evaluation at iteration 2 (storage step 1) and after training (step 4)
        png = acc.Images(tag)[-1].encoded_image_string
        picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert picture.shape[:2] == (128, 128) and picture.std() > 5


def test_visualize_dataloader_output(datasets_root, tmp_path, repo_script):
    from conftest import QUICK_STAGE0

    tool = repo_script("tools/visualize_data.py")
    written = tool.main(
        [
            "--source",
            "dataloader",
            "--config-file",
            QUICK_STAGE0,
            "--output-dir",
            str(tmp_path),
            "--num",
            "3",
            "INPUT.IMAGE_SIZE",
            "128",
            "SOLVER.IMS_PER_BATCH",
            "2",
        ]
    )
    assert len(written) == 3
    for path in written:
        picture = cv2.imread(path)
        assert picture.shape[:2] == (128, 128)  # the LSJ crop, i.e. what the model trains on
