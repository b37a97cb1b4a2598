"""Stream thinking and answer as they are generated (newline-delimited JSON).

python examples/stream_client.py [URL] [IMAGE]      (start the server first: make demo)
"""

import json
import sys
from pathlib import Path

import requests

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:3000"
IMAGE = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "images" / "house.jpg"

files = {
    "image_file": (IMAGE.name, IMAGE.read_bytes(), "image/jpeg"),
    "request_data": (None, json.dumps({"text_prompt": "描述这张图片", "max_tokens": 128})),
}
with requests.post(f"{URL}/v1/vision/stream", files=files, stream=True, timeout=600) as response:
    response.raise_for_status()
    part = None
    for line in response.iter_lines():
        if not line:
            continue
        event = json.loads(line)
        if event["type"] == "done":
            print(f"\n\n[{event['finish_reason']}] usage: {event['usage']}")
            break
        if event["type"] != part:
            part = event["type"]
            print(f"\n--- {part} ---")
        print(event["text"], end="", flush=True)
