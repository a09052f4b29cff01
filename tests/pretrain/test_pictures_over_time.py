"""Pictures over time: the same kept batch drawn every trainer.pictures_every steps, logged with its step."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from pretrain.tracking import RunLogger
from pretrain.trainer.pictures import draw_pictures, remember_first


class Painter(nn.Module):
    """An objective's picture hook: an image whose brightness is its weight (what training would change)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.modes: list[bool] = []

    def pictures(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        self.modes.append(self.training)
        noise = torch.rand(())  # pictures may draw random masks: the training's stream must not move
        level = int(255 * float(self.w.clamp(0, 1))) if noise >= 0 else 0
        return {"recon": np.full((4, 4, 3), level, dtype=np.uint8)}


def test_the_first_batch_is_kept_as_a_copy_and_every_batch_still_flows() -> None:
    kept: list[dict] = []
    source = [{"image": torch.full((2, 3), float(n))} for n in range(3)]
    seen = list(remember_first(iter(source), kept))
    assert seen == source and len(kept) == 1
    source[0]["image"].add_(10)  # the trainer may change its batch in place: the kept copy stays
    assert torch.equal(kept[0]["image"], torch.zeros(2, 3))


def test_pictures_are_a_series_over_steps_and_leave_rng_and_mode_alone(tmp_path: Path, empty_mlflow_store) -> None:
    from mlflow import MlflowClient

    uri = empty_mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("p", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(exp).info.run_id
    logger = RunLogger(uri, run_id)
    painter = Painter()
    engine = SimpleNamespace(module=painter)
    batch = {"image": torch.zeros(2, 3, 8, 8)}
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    for step, w in ((100, 0.25), (200, 0.5), (300, 1.0)):
        painter.w.data.fill_(w)
        draw = dict(rank=0, device=torch.device("cpu"), dtype=torch.float32, logger=logger, step=step)
        draw_pictures(engine, batch, final=step == 300, **draw)
    assert torch.equal(torch.rand(3), expected_next)  # drawing consumed none of the run's random numbers
    assert painter.modes == [False] * 3 and painter.training  # drawn in eval mode, back to train
    files = [a.path for a in client.list_artifacts(run_id, "images")]
    # MLflow 3 names a series' files images/<key, / as ~>+step+<step>+timestamp+...png (plus a .webp preview).
    series = [f.split("+step+")[1].split("+")[0] for f in files if f.endswith(".png")]
    assert all(f.startswith("images/pictures~recon+step+") for f in files)
    assert sorted(map(int, series)) == [100, 200, 300]
    assert [a.path for a in client.list_artifacts(run_id, "pictures")] == ["pictures/recon.png"]
    final = client.download_artifacts(run_id, "pictures/recon.png", str(tmp_path / "dl"))
    from PIL import Image

    assert np.asarray(Image.open(final))[0, 0, 0] == 255  # the last drawing (w = 1.0)
