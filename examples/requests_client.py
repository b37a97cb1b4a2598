"""The original tutorial's `requests` client, unchanged in what it sends.

python examples/requests_client.py [URL] [IMAGE]      (start the server first: make demo)
"""

import json
import sys
from pathlib import Path

import requests

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:3000"
IMAGE = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "images" / "house.jpg"

with open(IMAGE, "rb") as f:
    files = {
        "image_file": (IMAGE.name, f, "image/jpeg"),
        "request_data": (None, json.dumps({"text_prompt": "描述这张图片", "max_tokens": 256}), "application/json"),
    }
    response = requests.post(f"{URL}/v1/vision/inference", files=files, timeout=600)

response.raise_for_status()
body = response.json()
print("thinking:", body["thinking"][:200])
print("answer:  ", body["result"][:200])
print("usage:   ", body["usage"], "| finish_reason:", body["finish_reason"])
print(f"took {body['processing_time']:.2f} s on {body['model_info']['device']}")
