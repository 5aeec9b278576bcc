"""`reelflow bench scale` measures real nights: a first night plans every object, a quiet night none."""

from __future__ import annotations

from jobs import bench_scale


def test_bench_scale_plans_first_and_quiet_nights_and_measures_both_processes(ray_session, tmp_path):
    config = bench_scale.BenchScaleConfig(objects=30, factor=2, commit_every=7, workdir=str(tmp_path),
                                          record=False)  # fmt: skip
    scenarios = bench_scale.main(config)
    nights = {(s.night, s.objects): s for s in scenarios}
    assert set(nights) == {("first", 30), ("quiet", 30), ("first", 60), ("quiet", 60)}
    assert [nights["first", n].todo for n in (30, 60)] == [30, 60]
    assert [nights["quiet", n].todo for n in (30, 60)] == [0, 0]
    for s in scenarios:
        assert s.driver_mib > 50 and s.worker_mib > 50 and s.plan_s > 0
