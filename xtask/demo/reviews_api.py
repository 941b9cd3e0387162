"""reviews-api, the demo's back service (FastAPI on uvicorn, no tracing
code): GET /reviews/{band} answers at once, except for one band whose
reviews take a slow path (the span worth finding in the demo's traces).

usage: reviews_api.py PORT
"""
import asyncio
import sys

import fastapi
import uvicorn

port = int(sys.argv[1])
app = fastapi.FastAPI()
STARS = {"the-beatles": 5, "radiohead": 4, "the-slow-band": 3, "daft-punk": 4}


@app.get("/reviews/{band}")
async def reviews(band: str):
    if band == "the-slow-band":
        # The slow path: a full scan nobody indexed.
        await asyncio.sleep(0.3)
    return {"band": band, "stars": STARS.get(band, 0)}


uvicorn.run(app, host="0.0.0.0", port=port, log_level="warning", access_log=False)
