"""`edged soak --quick`: real daemons and a real Mosquitto (persistence on) under faults, kiosks by the rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.soak import format_report, sizes, soak


@pytest.mark.model
def test_quick_soak_answers_every_request_once(smollm2_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Through broker restarts (SIGTERM and SIGKILL), a daemon killed mid-generation, a critical temperature and
    a fleet node lost, every request a kiosk sent gets a final reply (an error with a contract code when
    refused), no id gets more final replies than copies of it reached the broker, and no daemon crashes."""
    model = smollm2_dirs["int4"]
    report = soak(model.parent, model.name, quick=True, workdir=tmp_path, log=print)
    print(format_report(report))

    planned = {s.name: s for s in sizes(quick=True).scenarios}
    assert [r["scenario"] for r in report["scenarios"]] == list(planned)
    for r in report["scenarios"]:
        s = planned[r["scenario"]]
        name = s.name
        # the faults really happened, so the invariant was tested under them
        assert [f["fault"] for f in r["faults"]] == [fault for _, fault in s.faults], name
        assert r["sent"] == s.kiosks * s.requests, name
        assert r["accepted"] > 0, name
        assert r["lost"] == 0, f"{name}: lost {r['lost_ids']}"
        assert r["duplicates_beyond_sends"] == 0, f"{name}: {r['duplicate_finals']}"
        assert r["bad_errors"] == 0, name
        assert r["accepted"] + r["refused"] == r["answered"] == r["sent"], name
        assert r["daemons_survived"], f"{name}: {r['daemons']}"
    by_name = {r["scenario"]: r for r in report["scenarios"]}
    assert "mid-generation" in by_name["daemon"]["faults"][0]["what"]
    thermal = by_name["thermal"]
    assert thermal["errors"].get("thermal", 0) + thermal["finish_reasons"].get("thermal", 0) > 0
    assert [d["killed_for_good"] for d in by_name["fleet"]["daemons"]] == [False, True]
    assert report["ok"]
