"""An asyncio actor as a service: a `Tokenizer` actor whose methods are `async def` serves
many requests at once on its event loop (`max_concurrency`), gathering those that arrive
together into one batch, as a model server batches requests for its GPU. The driver sends
every request at once from asyncio (`await ref`), and checks each answer and that requests
were batched.

    python examples/python/async_service.py            # 200 requests
    python examples/python/async_service.py --large    # 5,000 requests
    IONET_API_KEY=<key> python examples/python/async_service.py --address HEAD:6380
"""

import asyncio
import time
import zlib

import ionet
from _example import fail, size, start


def encode(text: str) -> list:
    """The "model": a word's id is its CRC-32 modulo a vocabulary of 50,000."""
    return [zlib.crc32(word.encode()) % 50_000 for word in text.split()]


@ionet.remote(max_concurrency=64)
class Tokenizer:
    def __init__(self):
        self.queue = []
        self.batches = []

    async def encode(self, text: str) -> list:
        done = asyncio.get_running_loop().create_future()
        self.queue.append((text, done))
        if len(self.queue) == 1:
            # The first of a batch waits a moment for others, then serves them all.
            await asyncio.sleep(0.005)
            batch, self.queue = self.queue, []
            self.batches.append(len(batch))
            for queued, future in batch:
                future.set_result(encode(queued))
        return await done

    async def batch_sizes(self) -> list:
        return self.batches


async def serve(tokenizer, texts):
    return await asyncio.gather(*[tokenizer.encode.remote(text) for text in texts])


def main() -> None:
    args = start("an asyncio actor serving batched requests")
    requests = size(args, 200, 5_000)
    texts = [f"request {n} asks the service to encode {n % 17} words of text" for n in range(requests)]
    tokenizer = Tokenizer.remote()
    started = time.time()
    answers = asyncio.run(serve(tokenizer, texts))
    seconds = time.time() - started
    batches = ionet.get(tokenizer.batch_sizes.remote())
    print(f"{requests} requests answered in {seconds:.2f} s, in {len(batches)} batches (largest {max(batches)})")
    if answers != [encode(text) for text in texts]:
        fail("an answer differs from encoding the text here")
    if sum(batches) != requests or max(batches) < 2:
        fail(f"the requests were not batched: {batches}")
    print("checked: every answer is the text's encoding, and requests were served in batches")
    ionet.shutdown()


if __name__ == "__main__":
    main()
