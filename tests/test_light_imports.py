"""Reading the service (what `bentoml serve`'s own process and `bentoml build` do) needs neither
torch nor transformers: only the worker that runs the model imports them, so serving starts sooner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import glm4v_bento.engine as engine

ROOT = Path(__file__).resolve().parent.parent


def test_reading_the_service_imports_neither_torch_nor_transformers(tiny_model_dir):
    check = (
        "import sys, service\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'reading the service imported {heavy}'\n"
        "assert service.GLM4V is not None\n"
    )
    env = {**os.environ, "GLM4V_MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_name_the_engine_exports_is_found_where_it_says():
    assert sorted(engine.__all__) == sorted(engine._WHERE)
    for name in engine.__all__:
        assert getattr(engine, name) is not None  # its module defines it (else AttributeError)
    assert set(engine.__all__) <= set(dir(engine))
