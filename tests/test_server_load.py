"""A bounded load run on loopback: 10 clients x 3 submissions with status polling; nothing lost or duplicated.

The larger run (20 x 10) is `benchmarks/server_load.py`; each job costs about a second of CPU here."""

import sys
from pathlib import Path

from conftest import LiveServer
from vidsynth.server import ServerSettings, create_app

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from server_load import run_load  # noqa: E402


def test_ten_clients_three_jobs_each(shipped_pipeline, tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path, max_queue=1000), pipeline=shipped_pipeline)
    with LiveServer(app) as live:
        result = run_load(live.url, clients=10, jobs_per_client=3, timeout=300)
    assert result["failures"] == []
    assert result["jobs"] == result["completed"] == result["distinct_ids"] == 30
    assert result["listed"] == 30 and result["unexpected_listed"] == 0
    assert len(list((tmp_path / "videos").iterdir())) == 30  # one folder of files per job, no strays
