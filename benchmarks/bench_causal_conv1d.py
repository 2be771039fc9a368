"""Benchmarks of causal_conv1d: the cases of `python -m ssmkernels bench -p causal_conv1d`, all impls."""
import pytest

from ssmkernels.bench import cases, runner

PARAMS = [pytest.param(case, label, id=f"{case.name}[{label}]")
          for case in cases.select(["causal_conv1d"]) for label in runner.labels(case)]


@pytest.mark.parametrize("case,label", PARAMS)
def test_causal_conv1d(bench_case, case, label):
    bench_case(case, label)
