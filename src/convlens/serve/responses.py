"""The one JSON error shape of every ``convlens serve`` error response."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_response(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": <short code>, "message": <one line>}`` with ``status``."""
    return JSONResponse({"error": error, "message": message}, status_code=status, headers=headers)
