"""explainer.logs: one configuration per process; rank 0 speaks at INFO, the other ranks only from WARNING."""

from __future__ import annotations

import logging

import pytest

from explainer.logs import configure_logging, get_logger


@pytest.fixture
def restore_logger():
    root = logging.getLogger("explainer")
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = handlers, level, propagate


def test_rank0_info_other_ranks_warnings_only(capsys, restore_logger):
    log = get_logger("explainer.somewhere")
    configure_logging(rank=0)
    log.info("plan line")
    configure_logging(rank=3)
    configure_logging(rank=3)  # idempotent: still one handler, so no duplicated lines
    log.info("hidden on rank 3")
    log.warning("non-finite loss")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[explainer] plan line", "[explainer] non-finite loss"]


def test_rank_defaults_to_the_launchers_variable(capsys, monkeypatch, restore_logger):
    monkeypatch.setenv("RANK", "1")
    configure_logging()
    get_logger("training_loop").info("rank 1 says nothing at INFO")
    assert capsys.readouterr().out == ""
    assert get_logger("training_loop").name == "explainer.training_loop"
