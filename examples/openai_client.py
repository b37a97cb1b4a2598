"""Call the server with the official `openai` client: thinking in reasoning_content, answer in content.

python examples/openai_client.py [URL] [IMAGE]      (start the server first: make demo)
"""

import base64
import sys
from pathlib import Path

from openai import OpenAI

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:3000"
IMAGE = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "images" / "house.jpg"

client = OpenAI(base_url=f"{URL}/v1", api_key="not-needed-unless-the-server-sets-keys")
model = client.models.list().data[0].id
image_uri = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_uri}},
            {"type": "text", "text": "What is in this picture?"},
        ],
    }
]

response = client.chat.completions.create(model=model, messages=messages, max_tokens=256, temperature=0)
message = response.choices[0].message
print("reasoning:", (getattr(message, "reasoning_content", None) or "")[:200])
print("answer:   ", message.content[:200])
print("usage:    ", response.usage.model_dump(exclude_none=True), "| finish_reason:", response.choices[0].finish_reason)

print("\nstreamed: ", end="")
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=64, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    if chunk.choices:
        delta = chunk.choices[0].delta
        print(getattr(delta, "reasoning_content", None) or delta.content or "", end="", flush=True)
    if chunk.usage:
        print(f"\nusage: {chunk.usage.total_tokens} tokens")
