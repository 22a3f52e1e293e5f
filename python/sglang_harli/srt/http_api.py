"""Harli's HTTP routes, mounted on SGLang's own FastAPI app in the main process."""

from __future__ import annotations

from sglang_harli.config import HarliConfig


def mount_routes(app, harli_config: HarliConfig) -> None:
    """Add ``GET /harli/status`` to SGLang's app (before the server starts)."""

    @app.get("/harli/status")
    async def harli_status() -> dict:
        """Mode, decode iterations seen and hook overhead, per scheduler (DP rank)."""
        if not harli_config.enabled:
            return {"mode": harli_config.mode, "schedulers": []}
        from sglang.srt.entrypoints.http_server import get_global_state

        internal_states = await get_global_state().tokenizer_manager.get_internal_state()
        schedulers = [state["harli"] for state in internal_states if "harli" in state]
        return {
            "mode": harli_config.mode,
            "decode_iterations": sum(s["decode_iterations"] for s in schedulers),
            "schedulers": schedulers,
        }
