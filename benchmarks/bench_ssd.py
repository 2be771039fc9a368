"""Benchmarks of ssd: the cases of `python -m ssmkernels bench -p ssd`, all impls."""
import pytest

from ssmkernels.bench import cases, runner

PARAMS = [pytest.param(case, label, id=f"{case.name}[{label}]")
          for case in cases.select(["ssd"]) for label in runner.labels(case)]


@pytest.mark.parametrize("case,label", PARAMS)
def test_ssd(bench_case, case, label):
    bench_case(case, label)
