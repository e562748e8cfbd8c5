"""Binary replies (copies, model files, public files): a streamed body with its length."""

from __future__ import annotations

from typing import Iterator

from fastapi.responses import StreamingResponse

BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def binary_reply(description: str, *statuses: int) -> dict:
    """The OpenAPI `responses` entry of a binary reply."""
    return {status: {"content": BINARY, "description": description} for status in statuses or (200,)}


def binary_response(size: int, chunks: Iterator[bytes], status_code: int = 200, headers: dict | None = None,
                    ) -> StreamingResponse:
    return StreamingResponse(chunks, status_code=status_code, media_type="application/octet-stream",
                             headers={"Content-Length": str(size), **(headers or {})})
