#!/usr/bin/env bash
# The original tutorial's curl call, unchanged. Start the server first: `make demo`.
#   bash examples/curl.sh [URL] [IMAGE]
set -euo pipefail
URL=${1:-http://localhost:3000}
IMAGE=${2:-$(dirname "$0")/images/house.jpg}

curl -s -X POST "$URL/v1/vision/inference" \
  -F "image_file=@$IMAGE" \
  -F 'request_data={"text_prompt": "描述这张图片", "max_tokens": 512}'
echo
