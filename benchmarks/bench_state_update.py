"""Benchmarks of state_update: the cases of `python -m ssmkernels bench -p state_update`, all impls."""
import pytest

from ssmkernels.bench import cases, runner

PARAMS = [pytest.param(case, label, id=f"{case.name}[{label}]")
          for case in cases.select(["state_update"]) for label in runner.labels(case)]


@pytest.mark.parametrize("case,label", PARAMS)
def test_state_update(bench_case, case, label):
    bench_case(case, label)
