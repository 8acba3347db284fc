"""The servers trainserve's /predict is compared with, serving the same checkpoint file with the same
decoding and preprocessing (models.preprocessing) and the same model (models.predictor):

- `naive`: the usual tutorial server, a plain FastAPI sync endpoint running one image per request.
- `litserve`: LitServe with its own dynamic batching (workers, threads and batching from the flags).

    python bench/baselines.py naive --checkpoint best.safetensors --port 8101
    python bench/baselines.py litserve --checkpoint best.safetensors --port 8102 --max-batch 8 \
        --batch-timeout 0.005 --workers 2 --threads 1 --api-servers 2
    python bench/baselines.py litserve --accelerator cuda ...      # LitServe places each worker on the GPU
"""

import argparse
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, File, HTTPException, Request, UploadFile

from models.predictor import Predictor
from models.preprocessing import ImageDecodeError, decode_image, to_uint8

try:  # only the LitServe baseline needs it: `pip install -e '.[bench]'`
    import litserve as ls

    LitAPI: type = ls.LitAPI
except ModuleNotFoundError:
    ls = None
    LitAPI = object


def scores_of(predictor: Predictor, row: list[float]) -> dict[str, Any]:
    best = max(range(len(row)), key=row.__getitem__)
    scores = dict(zip(predictor.classes, row, strict=True))
    return {"label": predictor.classes[best], "score": row[best], "scores": scores}


def run_naive(args: argparse.Namespace) -> None:
    import uvicorn

    predictor = Predictor(Path(args.checkpoint).read_bytes(), device=args.device)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, Any]:  # the tutorial way
        try:
            image = decode_image(file.file.read())
        except ImageDecodeError as exc:
            raise HTTPException(422, str(exc)) from None
        return scores_of(predictor, predictor.probabilities([image])[0].tolist())

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


class ClassifierAPI(LitAPI):  # type: ignore[misc, valid-type]
    """The same checkpoint behind LitServe: decode in decode_request, one forward pass per batch."""

    def __init__(self, checkpoint: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint, self.threads = checkpoint, threads

    def setup(self, device: str) -> None:  # "cpu", or "cuda:N" as LitServe assigns it
        torch.set_num_threads(self.threads)
        self.predictor = Predictor(Path(self.checkpoint).read_bytes(), device=device)

    def decode_request(self, request: Request) -> torch.Tensor:
        data = request["file"].file.read()
        return to_uint8(decode_image(data), self.predictor.preprocessing)

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return inputs

    def predict(self, x: torch.Tensor | list[torch.Tensor]) -> Any:
        tensors = x if isinstance(x, list) else [x]
        rows = self.predictor.probabilities_of(tensors).tolist()
        return rows if isinstance(x, list) else rows[0]

    def unbatch(self, output: list[list[float]]) -> list[list[float]]:
        return output

    def encode_response(self, output: list[float]) -> dict[str, Any]:
        return scores_of(self.predictor, output)


def run_litserve(args: argparse.Namespace) -> None:
    if ls is None:
        raise SystemExit("the LitServe baseline needs litserve: .venv/bin/pip install -e '.[bench]'")
    api = ClassifierAPI(
        args.checkpoint, args.threads, max_batch_size=args.max_batch, batch_timeout=args.batch_timeout
    )
    server = ls.LitServer(
        api,
        accelerator=args.accelerator,
        devices=1,
        workers_per_device=args.workers,
        timeout=60,
        fast_queue=args.fast_queue,
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("server", choices=["naive", "litserve"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=1, help="LitServe inference workers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads each")
    parser.add_argument("--api-servers", type=int, default=1, help="LitServe HTTP processes")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queues")
    parser.add_argument("--device", default="cpu", help="the naive server's device (cpu, cuda)")
    parser.add_argument("--accelerator", default="cpu", help="LitServe's accelerator (cpu, cuda)")
    args = parser.parse_args()
    (run_naive if args.server == "naive" else run_litserve)(args)


if __name__ == "__main__":
    main()
