"""The encoder stage logs that a prompt was cut, not the prompt itself."""

from __future__ import annotations

import logging

from ditmesh.encoder.service import ShortTruncationWarning, load_text_encoder


def test_the_filter_keeps_the_sentence_and_drops_the_text():
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1,
        "The following part of your input was truncated because CLIP can only handle "
        "sequences up to 77 tokens: ['my secret holiday plans in great detail']",
        None, None,
    )  # fmt: skip
    assert ShortTruncationWarning().filter(record)
    message = record.getMessage()
    assert "secret" not in message
    assert message.startswith("The following part of your input was truncated")
    assert message.endswith("characters cut)")


def test_a_long_prompt_is_not_copied_into_the_log(tiny_flux):
    from ditmesh.common.models import resolve_model

    encoder = load_text_encoder(resolve_model(tiny_flux), "cpu", "float32")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(type(encoder.pipe).__module__)
    handler = Keep()
    logger.addHandler(handler)
    try:
        words = " ".join(f"zebra{i}" for i in range(200))
        encoder.encode(words[: encoder.max_tokens * 2])
    finally:
        logger.removeHandler(handler)
    cut = [m for m in seen if "truncated" in m]
    assert cut, seen  # CLIP's 77 tokens were exceeded, so diffusers warned
    assert all("zebra" not in m for m in cut), cut
