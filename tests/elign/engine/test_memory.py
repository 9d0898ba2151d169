"""Host allocator settings: retained heap memory is reused without page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from elign.engine.errors import ConfigError
from elign.engine.memory import _glibc, configure_host_allocator

# One "training chunk": 40 live 8 MiB activations, all freed together (as after backward). Prints the
# minor page faults of the second chunk as a fraction of its pages.
_CHUNKS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from elign.engine.memory import configure_host_allocator
    print(configure_host_allocator(sys.argv[1]))
    def chunk():
        acts = [torch.ones(2 << 20) for _ in range(40)]
        del acts
    chunk()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    chunk()
    pages = 40 * (8 << 20) // resource.getpagesize()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
    """
)


def _second_chunk_fault_fraction(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHUNKS, mode], capture_output=True, text=True, check=True)
    applied, fraction = out.stdout.split()
    return applied, float(fraction)


@pytest.mark.skipif(_glibc() is None, reason="mallopt settings are glibc-only")
def test_retain_reuses_freed_pages_and_default_does_not() -> None:
    applied, retained = _second_chunk_fault_fraction("retain")
    assert applied == "True"
    assert retained < 0.3  # the second chunk runs on the first chunk's pages (measured: 0.03-0.15)
    applied, default = _second_chunk_fault_fraction("default")
    assert applied == "False"
    assert default > 0.5  # glibc gave the freed heap back: every page faults again


def test_bad_mode_names_the_key() -> None:
    with pytest.raises(ConfigError, match="host_allocator"):
        configure_host_allocator("jemalloc")
    with pytest.raises(ConfigError, match="top_pad_mib"):
        configure_host_allocator("retain", top_pad_mib=-1)


def test_rejected_settings_warn_and_report_false(monkeypatch: pytest.MonkeyPatch) -> None:
    class RejectingLibc:
        def mallopt(self, param: int, value: int) -> int:
            return 0 if param == -1 else 1  # M_TRIM_THRESHOLD refused

    monkeypatch.setattr("elign.engine.memory._glibc", lambda: RejectingLibc())
    with pytest.warns(UserWarning, match=r"rejected parameters \[-1\]"):
        assert configure_host_allocator("retain") is False


def test_default_mode_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("elign.engine.memory._glibc", lambda: pytest.fail("default mode must not call mallopt"))
    assert configure_host_allocator("default") is False
