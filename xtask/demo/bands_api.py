"""bands-api, the demo's front service (FastAPI on uvicorn, no tracing
code): GET /bands lists the bands with their reviews, asking reviews-api
for each band's, one after the other.

usage: bands_api.py PORT REVIEWS_URL
"""
import sys

import fastapi
import httpx
import uvicorn

port, reviews_url = int(sys.argv[1]), sys.argv[2]
BANDS = ["the-beatles", "radiohead", "the-slow-band", "daft-punk"]
app = fastapi.FastAPI()
client = httpx.AsyncClient(trust_env=False, timeout=10)


@app.get("/bands")
async def bands():
    listing = []
    for band in BANDS:
        answer = await client.get(f"{reviews_url}/reviews/{band}")
        listing.append(answer.json())
    return listing


uvicorn.run(app, host="0.0.0.0", port=port, log_level="warning", access_log=False)
