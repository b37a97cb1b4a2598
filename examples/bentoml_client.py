"""Call the typed `generate` API with BentoML's own Python client.

python examples/bentoml_client.py [URL] [IMAGE...]      (start the server first: make demo)
"""

import sys
from pathlib import Path

import bentoml

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:3000"
IMAGES = [Path(p) for p in sys.argv[2:]] or [Path(__file__).parent / "images" / "house.jpg"]

with bentoml.SyncHTTPClient(URL) as client:
    result = client.generate(
        prompt="What is in this picture?",
        images=IMAGES,
        system="Answer briefly.",
        params={"max_new_tokens": 256, "temperature": 0.6, "top_p": 0.9, "seed": 42},
    )

print("thinking:", result["thinking"][:200])
print("answer:  ", result["answer"][:200])
print("box:     ", result["box"])
print("usage:   ", result["usage"], "| finish_reason:", result["finish_reason"])
print("timings: ", {k: round(v, 3) for k, v in result["timings"].items()})
