"""The ``glm4v-bento`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from glm4v_bento.config import SettingsError


def _tiny_model(args: argparse.Namespace) -> int:
    from glm4v_bento.tiny import build_tiny_model

    started = time.perf_counter()
    out = build_tiny_model(args.directory, seed=args.seed)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    elapsed = time.perf_counter() - started
    print(f"tiny GLM-4.1V checkpoint written to {out} ({size / 1024:.0f} KiB, {elapsed:.1f} s)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Run one request through the engine and print the structured result."""
    from glm4v_bento.config import get_settings
    from glm4v_bento.engine import Engine, GenerationRequest, ModelLoadError, SamplingParams
    from glm4v_bento.images import ImageError, ImageLimits, load_image
    from glm4v_bento.model_source import ModelSource

    settings = get_settings()
    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    source = ModelSource.from_settings(settings)
    try:
        if source.kind == "local":
            source.checked_directory()
        limits = ImageLimits.from_settings(settings)
        images = [load_image(Path(path).read_bytes(), limits) for path in args.image]
    except (OSError, ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loading {settings.model} ...", file=sys.stderr)
    try:
        engine = Engine.from_settings(settings)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loaded = engine.loaded
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        request = GenerationRequest(prompt=args.prompt, images=images, params=params)
        print(f"generating on {loaded.device} ...", file=sys.stderr)
        [result] = engine.generate([request])
    finally:
        engine.close()
    print(json.dumps(result.model_dump(), ensure_ascii=False, indent=2))
    return 0 if result.finish_reason != "error" else 1


def _import_model(args: argparse.Namespace) -> int:
    from glm4v_bento.model_store import ImportError_, import_model

    try:
        tag = import_model(args.path, args.name, progress=not args.quiet)
    except ImportError_ as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported as {tag}; serve it with GLM4V_MODEL={tag}")
    return 0


_DEMO_BANNER = """
glm4v-bento is serving the offline tiny model at {url}
(random weights: the answers are random tokens; the API, batching and timings are real)

  {url}                 Swagger UI, every API with its schema
  bash examples/curl.sh {url}
  .venv/bin/python examples/requests_client.py {url}
  .venv/bin/python examples/bentoml_client.py {url}
  .venv/bin/python examples/stream_client.py {url}
  .venv/bin/python examples/openai_client.py {url}
  .venv/bin/python examples/async_concurrent_client.py {url} 16
  curl {url}/health

Press Ctrl-C to stop.
"""


def _demo(args: argparse.Namespace) -> int:
    """Build the tiny model if needed, serve it with `bentoml serve`, say how to call it."""
    import subprocess
    import urllib.request

    from glm4v_bento.tiny import build_tiny_model

    repo = Path(__file__).resolve().parent.parent
    if not (repo / "service.py").is_file():
        print("error: `glm4v-bento demo` runs from a checkout of the repository", file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir)
    url = f"http://localhost:{args.port}"
    env = {**os.environ, "GLM4V_MODEL": str(model_dir.resolve())}
    command = [sys.executable, "-m", "bentoml", "serve", "service:GLM4V", "--port", str(args.port)]
    server = subprocess.Popen(command, cwd=repo, env=env)
    # Ctrl-C and SIGTERM both stop the server, even where the demo was started with SIGINT
    # ignored (a background job of a script inherits that, and Python then keeps it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        deadline = time.monotonic() + 300
        while server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                    print(_DEMO_BANNER.format(url=url), flush=True)
                    break
            except OSError:
                time.sleep(0.5)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=60)


def _build(args: argparse.Namespace) -> int:
    from glm4v_bento.bento_build import BuildError, build_bento
    from glm4v_bento.config import get_settings

    settings = get_settings()
    if args.model:
        settings = settings.model_copy(update={"model": args.model, "revision": args.revision or settings.revision})
    try:
        tag = build_bento(settings)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(tag)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4v-bento", description="Serve GLM-4.1V-9B-Thinking with BentoML.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-model", help="build the offline tiny GLM-4.1V-format checkpoint")
    tiny.add_argument("directory", help="where to write it")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    tiny.set_defaults(run=_tiny_model)

    demo = commands.add_parser("demo", help="serve the offline tiny model and print how to call it")
    demo.add_argument("--model-dir", default=".models/tiny", help="where the tiny model is (built if missing)")
    demo.add_argument("--port", type=int, default=3000)
    demo.set_defaults(run=_demo)

    imp = commands.add_parser("import-model", help="put a local checkpoint into the BentoML model store")
    imp.add_argument("path", help="checkpoint directory (with config.json)")
    imp.add_argument("--name", required=True, help="model-store name, e.g. glm4v-tiny")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(run=_import_model)

    build = commands.add_parser("build", help="build the Bento with its model pinned (bentoml build)")
    build.add_argument("--model", help="hub id or model-store tag (default: GLM4V_MODEL)")
    build.add_argument("--revision", help="hub revision to pin (default: GLM4V_REVISION or main)")
    build.set_defaults(run=_build)

    gen = commands.add_parser("generate", help="run one prompt (with images) through the engine")
    gen.add_argument("--model", help="hub id or local directory (default: GLM4V_MODEL)")
    gen.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    gen.add_argument("--prompt", default="描述这张图片", help="text prompt")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the model's)")
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
