"""The run's console (dibs.lit.console): one line per message, bars that never swallow a line, quiet ranks > 0.

On a terminal the console handler is rich's and a log line printed while a bar is live starts on a line of its
own; off a terminal (pytest's captured streams, like a CI log) no bar is drawn at all and the handler writes plain
lines. Lightning's own handler and its tips are removed, its messages still reach the run's handlers once."""

import io
import logging
import re
import warnings

import pytest
from rich.console import Console
from rich.logging import RichHandler

import dibs.lit.console as console_module
from dibs.lit.console import console_handler, is_rank_zero, progress, setup_console
from dibs.rollout.base import SamplingParams
from dibs.rollout.hf import HFGenerator

FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@pytest.fixture()
def terminal(monkeypatch):
    """rich's global console replaced by a terminal of 100 columns writing into a buffer."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    monkeypatch.setattr(console_module, "get_console", lambda: console)
    return buffer


@pytest.fixture()
def no_rank(monkeypatch):
    for name in console_module.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def logger():
    log = logging.getLogger("dibs.tests.console")
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    log.handlers.clear()


def test_off_a_terminal_the_handler_writes_plain_lines_in_the_files_format(no_rank, logger, capsys):
    handler = console_handler(FORMAT)
    assert type(handler) is logging.StreamHandler and handler.level == logging.NOTSET
    logger.addHandler(handler)
    logger.info("iteration 1: E-step")
    out = capsys.readouterr().out
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[dibs\.tests\.console\]\[INFO\] - iteration 1: E-step\n", out)


def test_a_log_line_printed_while_a_bar_is_live_starts_a_line_of_its_own(no_rank, terminal, logger):
    handler = console_handler(FORMAT)
    assert isinstance(handler, RichHandler)
    logger.addHandler(handler)
    message = "held-out Average@4 (iteration 1): levels ['1', '2'] 11.2%"  # brackets: no rich markup
    with progress(10, "generating", unit="samples") as advance:
        advance(4)
        logger.info(message)
        advance(6)
    out = terminal.getvalue()
    assert "generating" in out and "10/10 samples" in out  # the bar was drawn, and reached its end
    at = out.index(message)
    start = max(out.rfind("\n", 0, at), out.rfind("\x1b[2K", 0, at) + 3)  # after a line break or a line erase
    assert re.fullmatch(r"(\[[\d:]+\])? *INFO +", out[start + 1 : at]), repr(out[start - 40 : at])
    assert out.count(message) == 1


def test_off_a_terminal_no_bar_is_drawn(no_rank, capsys, tiny_model, tokenizer, task):
    """The HF generator's bar (show_progress=True) writes nothing where redraws would only fill a log."""
    from dibs.data.prompts import PromptTemplate, encode_prompts

    _, prompts, _ = encode_prompts(task.test[:3], tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=256)
    generator = HFGenerator(tiny_model, tokenizer, token_budget=64, show_progress=True)
    out = generator.generate(prompts, [2, 2, 2], SamplingParams(max_new_tokens=4))
    assert [len(group) for group in out] == [2, 2, 2]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_on_a_rank_above_zero_only_errors_and_no_bar(monkeypatch, terminal, logger):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_rank_zero()
    handler = console_handler(FORMAT)
    assert handler.level == logging.ERROR
    logger.addHandler(handler)
    logger.warning("prompt pool: 3 prompts left out")  # rank 0 says it for the run
    with progress(10, "generating") as advance:
        advance(10)
    logger.error("rank 1 failed")
    out = terminal.getvalue()
    assert "rank 1 failed" in out and "prompt pool" not in out and "generating" not in out


@pytest.fixture()
def restore_warnings():
    yield
    logging.captureWarnings(False)


def test_lightning_messages_reach_the_runs_handlers_once_without_tips(caplog, restore_warnings):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    own = io.StringIO()  # what `import lightning` attaches to its logger (here again, whatever ran before)
    logging.getLogger("lightning").addHandler(logging.StreamHandler(own))
    setup_console()
    setup_console()  # idempotent
    with caplog.at_level(logging.INFO):
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GPU available: False, used: False"]
    assert own.getvalue() == ""  # Lightning's own handler is gone


def test_lightnings_internal_deprecation_warning_is_silenced_and_others_are_logged(caplog, restore_warnings):
    setup_console()
    with caplog.at_level(logging.WARNING, logger="py.warnings"):
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
            "treespec.is_leaf()` instead.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("`algo.old_key` is deprecated, use `algo.new_key`", FutureWarning, stacklevel=1)
    logged = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert len(logged) == 1 and "algo.old_key" in logged[0]  # through logging: above the bars, into the file
