"""Benchmarks of selective_scan: the cases of `python -m ssmkernels bench -p selective_scan`, all impls."""
import pytest

from ssmkernels.bench import cases, runner

PARAMS = [pytest.param(case, label, id=f"{case.name}[{label}]")
          for case in cases.select(["selective_scan"]) for label in runner.labels(case)]


@pytest.mark.parametrize("case,label", PARAMS)
def test_selective_scan(bench_case, case, label):
    bench_case(case, label)
