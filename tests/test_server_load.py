"""A bounded load run on loopback: 20 clients x 10 submissions with status polling; nothing lost or duplicated."""

import sys
from pathlib import Path

from conftest import LiveServer
from vidsynth.server import ServerSettings, create_app

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from server_load import run_load  # noqa: E402


def test_twenty_clients_ten_jobs_each(shipped_pipeline, tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path, max_queue=1000), pipeline=shipped_pipeline)
    with LiveServer(app) as live:
        result = run_load(live.url, clients=20, jobs_per_client=10, timeout=300)
    assert result["failures"] == []
    assert result["jobs"] == result["completed"] == result["distinct_ids"] == 200
    assert result["listed"] == 200 and result["unexpected_listed"] == 0
    assert len(list((tmp_path / "videos").iterdir())) == 200  # one folder of files per job, no strays
