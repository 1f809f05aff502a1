"""A local web page to watch, compare and chat with runs:

  hfpipe ui                     # the runs under outputs/, at http://127.0.0.1:7860
  hfpipe ui runs/ --port 8080

Runs: every run dir under the folder with its stage, status (running, finished, interrupted), key metrics, loss and
reward curves (a running training's curves update as it logs), samples before and after, and its saved config.
Compare: two or more runs side by side (the config keys that differ, metrics, curves overlaid, samples). Chat: a
finished run, or two side by side on the same message, with `hfpipe chat`'s decoding knobs.

The page only reads: no action on it trains, deletes or overwrites anything. It listens on 127.0.0.1 unless
--host says otherwise, loads no script or font from the network, and loads a model only when a chat asks for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfpipe.errors import ConfigError
from hfpipe.tools.model_flags import add_model_flags
from hfpipe.tools.ui_chat import ChatRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

    from hfpipe.tools.ui_chat import ModelPool

DEFAULT_PORT = 7860  # Gradio's, where a Hugging Face user looks first
PAGE = Path(__file__).with_name("ui_page.html")


class ChatBody(ChatRequest):
    """POST /api/chat: a chat turn for the run named (its path under the runs folder)."""

    run: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hfpipe ui`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("runs", nargs="?", type=Path, default=Path("outputs"), help="folder of runs (default: outputs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})")
    add_model_flags(parser)


def check_args(args: argparse.Namespace) -> None:
    """Refuse a missing runs folder or a port nothing can listen on, before anything starts."""
    from hfpipe.tools.serve import check_port_free

    if not args.runs.is_dir():
        raise ConfigError(f"{args.runs}: no such folder. Give the folder your runs are in (default: outputs).")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be between 1 and 65535.")
    check_port_free(args.host, args.port)


def create_app(root: Path, pool: ModelPool | None = None) -> FastAPI:
    """The page and its JSON API over the runs under `root`; chat models come from `pool` (default: as saved, on a
    GPU when there is one)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    from hfpipe.tools import ui_runs
    from hfpipe.tools.ui_chat import ModelPool, answer

    pool = pool or ModelPool()
    app = FastAPI(title="hfpipe ui", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ConfigError)
    async def _refused(_: Request, error: ConfigError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"root": str(root), "runs": [ui_runs.summary(run) for run in ui_runs.find_runs(root)]}

    @app.get("/api/run")
    def run(name: str) -> dict[str, Any]:
        return ui_runs.details(ui_runs.resolve_run(root, name))

    @app.get("/api/compare")
    def compare(name: list[str] = Query()) -> dict[str, Any]:  # noqa: B008 (FastAPI's way to declare a list)
        return ui_runs.compare([ui_runs.resolve_run(root, one) for one in name])

    @app.post("/api/chat")
    def chat(body: ChatBody) -> dict[str, Any]:  # a plain def: FastAPI runs it in a thread, off the event loop
        return answer(pool, ui_runs.resolve_run(root, body.run), body)

    return app


def run(args: argparse.Namespace) -> None:
    """Run `hfpipe ui` until Ctrl+C."""
    check_args(args)
    import uvicorn

    from hfpipe.tools.ui_chat import ModelPool

    app = create_app(args.runs, ModelPool(args.dtype, args.device, args.trust_remote_code))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"hfpipe ui: the runs under {args.runs} at http://{host}:{args.port} (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
