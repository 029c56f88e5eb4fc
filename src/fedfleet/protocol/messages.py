"""JSON control messages of the /v1 API, validated by pydantic on both sides."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fedfleet.errors import ProtocolError

API = "/v1"
WorkerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
UPDATE_META_KEY = "fedfleet"  # key in the safetensors __metadata__ that holds UpdateMeta as JSON


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegisterRequest(Message):
    worker_id: WorkerId | None = Field(None, description="stable id from the worker's state dir; "
                                                         "omit to be given one")
    name: str = Field("", max_length=200, description="free text shown on the dashboard, e.g. the host")
    data_source: Literal["partitions", "sites"] = Field(
        "partitions", description="sites: this worker brings its own data (fedfleet worker --data); partitions: "
                                  "it trains on the partition of the task's shared data set it is given")


class PartitionInfo(Message):
    name: str
    index: int
    count: int
    scheme: str
    seed: int
    val_fraction: float = Field(0.0, ge=0, le=0.5, description="share kept to evaluate the global model")


class RegisterResponse(Message):
    worker_id: str
    run_id: str
    task: str
    task_options: dict[str, str]
    partition: PartitionInfo
    poll_seconds: float = Field(description="longest long-poll the coordinator holds open")
    token: str | None = Field(default=None, description="this worker's own bearer token for every later call; "
                                                "None when the coordinator needs no tokens")


class TrainParamsMsg(Message):
    local_epochs: int
    batch_size: int
    lr: float
    seed: int
    prox_mu: float = Field(0.0, description="FedProx: weight of the proximal term μ/2·‖w − w_global‖²")
    report_labels: bool = Field(False, description="send the training examples' count per class index with the "
                                                   "update (metrics label_count_<k>); false under differential "
                                                   "privacy or secure aggregation, which the counts would bypass")


# Secure aggregation (fedfleet.secagg): keys, key shares and masks travel as base64 in JSON.
B64 = Annotated[str, Field(max_length=400, pattern=r"^[A-Za-z0-9+/=]*$")]


def to_b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def from_b64(value: str, what: str) -> bytes:
    """The bytes of a B64 field; a 422 naming ``what`` if it is not valid base64 (a bad padding, say)."""
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ProtocolError(f"{what} is not base64", status=422, reason="bad_secagg") from exc


class SecAggTrainContext(Message):
    """What a worker needs to mask its update in a securely aggregated round."""

    neighbours: list[WorkerId] = Field(max_length=100_000, description="the neighbours it masks with")
    shares: dict[WorkerId, B64] = Field(max_length=100_000, description="the key shares dealt to it, by dealer, "
                                                                        "encrypted for it")
    scale: float = Field(gt=0, description="fixed-point scale of the ring encoding (secagg.ring)")
    clip: float = Field(gt=0, description="each coordinate of the delta is clipped to [-clip, clip]")
    num_examples: int = Field(ge=1, description="the example count it announced with its keys")
    dp_clip: float | None = Field(default=None, gt=0, description="--dp distributed: clip the delta's L2 norm to this")
    dp_noise_std: float | None = Field(
        default=None, ge=0, description="--dp distributed: add N(0, std²) to each coordinate of the clipped delta "
                                        "(this worker's share of the noise)")
    dp_frozen: list[str] = Field(default_factory=list, max_length=10_000,
                                 description="--dp distributed: tensors left out (delta and noise zero)")


class TrainInstruction(Message):
    """Train on your partition from model ``model_version`` and upload the update for this round; with
    ``secagg``, upload it masked (``fedfleet.secagg``)."""

    kind: Literal["train"] = "train"
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)
    model_version: int = Field(ge=0)
    params: TrainParamsMsg
    secagg: SecAggTrainContext | None = None


class SecAggKeysInstruction(Message):
    """Secure aggregation, phase 1: make fresh keys for this round attempt and POST ``/v1/secagg/keys``."""

    kind: Literal["secagg_keys"] = "secagg_keys"
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)


class SecAggPeer(Message):
    worker_id: WorkerId
    x: int = Field(ge=1, description="its share coordinate")
    enc_key: B64
    mask_key: B64


class SecAggShareInstruction(Message):
    """Secure aggregation, phase 2: deal shares of your secrets to ``peers`` (your neighbours and you) and
    POST them to ``/v1/secagg/shares``."""

    kind: Literal["secagg_share"] = "secagg_share"
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)
    peers: list[SecAggPeer] = Field(max_length=100_000)
    threshold: int = Field(ge=2)


class SecAggUnmaskInstruction(Message):
    """Secure aggregation, phase 4: reveal your shares of the self-mask seeds of ``survivors`` and of the
    mask keys of ``dropped`` (POST ``/v1/secagg/reveal``); never both for one worker."""

    kind: Literal["secagg_unmask"] = "secagg_unmask"
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)
    survivors: list[WorkerId] = Field(max_length=100_000)
    dropped: list[WorkerId] = Field(max_length=100_000)


class StatsInstruction(Message):
    """Report your partition's statistics (the task's ``local_stats``) for the statistics round."""

    kind: Literal["stats"] = "stats"
    round: int = Field(ge=0)
    attempt: int = Field(ge=0)


class DescribeInstruction(Message):
    """Describe your data (the task's ``describe``: aggregates, never rows) and POST it to
    ``/v1/workers/{id}/description``: the run agrees its plan from the sites' descriptions."""

    kind: Literal["describe"] = "describe"


class WaitInstruction(Message):
    """Nothing for you yet: ask again."""

    kind: Literal["wait"] = "wait"


class StopInstruction(Message):
    """The run is over (``reason`` says how): exit."""

    kind: Literal["stop"] = "stop"
    reason: str = ""


# What a worker is told to do next. Not called a "task": that word means the ML task (data + model).
Instruction = Annotated[TrainInstruction | StatsInstruction | DescribeInstruction | WaitInstruction
                        | StopInstruction | SecAggKeysInstruction | SecAggShareInstruction
                        | SecAggUnmaskInstruction, Field(discriminator="kind")]
SecAggInstruction = SecAggKeysInstruction | SecAggShareInstruction | SecAggUnmaskInstruction
INSTRUCTION = TypeAdapter(Instruction)
# A long-poll asked with ``have=VERSION`` (the model version the worker holds) is answered with the model too when
# the instruction is to train on a newer one, and the model is small: one request a round instead of two. The body
# is then the instruction's JSON followed by the model's safetensors bytes (as GET /v1/model serves them); this
# header says how many bytes the JSON takes, and X-Fedfleet-Model-Version which version the model is.
INSTRUCTION_BYTES_HEADER = "X-Fedfleet-Instruction-Bytes"
MODEL_VERSION_HEADER = "X-Fedfleet-Model-Version"
INLINE_MODEL_BYTES = 2 * 2**20  # larger models are downloaded on their own, once per worker process


class UpdateMeta(Message):
    """Sent inside the update's safetensors header (``__metadata__["fedfleet"]``)."""

    worker_id: WorkerId
    round: int = Field(ge=0)
    attempt: int = Field(ge=0)
    num_examples: int = Field(ge=1, le=10**12)
    # Checked loosely here (the whole header is bounded in size anyway); the coordinator keeps only the
    # metrics whose names and values are valid (storage.records.clean_worker_metrics), and counts the
    # rest as dropped, rather than refusing an otherwise good update for a bad metric. None stands for
    # a value JSON cannot hold (pydantic writes NaN and Infinity as null).
    metrics: dict[str, float | None] = Field(default_factory=dict, max_length=256)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> UpdateMeta:
        raw = metadata.get(UPDATE_META_KEY)
        if raw is None:
            raise ProtocolError(f"update has no '{UPDATE_META_KEY}' entry in its safetensors __metadata__",
                                status=422, reason="bad_metadata")
        try:
            return cls.model_validate(json.loads(raw))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ProtocolError(f"update metadata is invalid: {one_line(exc)}", status=422,
                                reason="bad_metadata") from exc
        except RecursionError as exc:
            raise ProtocolError("update metadata is invalid: JSON nested too deeply", status=422,
                                reason="bad_metadata") from exc


class SecAggKeys(Message):
    """``POST /v1/secagg/keys``: a worker's public keys for one round attempt, a commitment to its self-mask
    seed, and its example count (not secret: the aggregate is weighted by it)."""

    worker_id: WorkerId
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)
    enc_key: B64
    mask_key: B64
    seed_commitment: B64
    num_examples: int = Field(ge=1, le=10**12)


class DealtShare(Message):
    ciphertext: B64
    mask_key_commitment: B64
    self_mask_commitment: B64


class SecAggShares(Message):
    """``POST /v1/secagg/shares``: the shares a worker dealt, by holder, each encrypted for its holder."""

    worker_id: WorkerId
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)
    shares: dict[WorkerId, DealtShare] = Field(max_length=100_000)


class SecAggReveal(Message):
    """``POST /v1/secagg/reveal``: the shares a worker reveals to unmask the round, by dealer."""

    worker_id: WorkerId
    round: int = Field(ge=1)
    attempt: int = Field(ge=0)
    self_mask_shares: dict[WorkerId, B64] = Field(max_length=100_000)
    mask_key_shares: dict[WorkerId, B64] = Field(max_length=100_000)


class SecAggAck(Message):
    accepted: bool
    phase: str


class Decline(Message):
    """A sampled worker will not answer this round attempt (``POST /v1/workers/{id}/decline``): its fit
    diverged or failed. The round then stops waiting for it instead of running to its deadline."""

    round: int = Field(ge=0)
    attempt: int = Field(ge=0)
    # Shown in the coordinator's log: one line of printable text, bounded.
    reason: str = Field(default="", max_length=300, pattern=r"^[^\x00-\x1f\x7f]*$")


class DeclineAck(Message):
    declined: bool = Field(description="false: that attempt is not open, or does not wait for this worker")


class DescriptionBody(Message):
    """A worker's description of its data (``POST /v1/workers/{id}/description``), checked by the task."""

    description: dict[str, Any]


class DescriptionAck(Message):
    accepted: bool
    described: int = Field(description="workers whose description the run has accepted")


class PlanResponse(Message):
    """The run's plan (``GET /v1/plan``): None until the sites' descriptions are in and it is agreed."""

    plan: dict[str, Any] | None


class UpdateAck(Message):
    accepted: bool
    round: int
    received: int
    expected: int


class UploadRequest(Message):
    """Open a resumable upload of one update (``POST /v1/uploads``); its bytes follow in chunks."""

    worker_id: WorkerId
    round: int = Field(ge=0)
    attempt: int = Field(ge=0)
    total_bytes: int = Field(ge=9, description="size of the whole safetensors body")


class UploadStatus(Message):
    """Where a resumable upload stands: send the bytes from ``offset`` on. ``ack`` is set once the last
    byte arrived and the update was accepted, exactly as ``POST /v1/updates`` would answer."""

    upload_id: str
    worker_id: str
    round: int
    attempt: int
    offset: int = Field(description="bytes received and kept so far")
    total_bytes: int
    ack: UpdateAck | None = None


class EvalResult(Message):
    round: int
    model_version: int
    loss: float
    accuracy: float
    examples: int


class WorkerView(Message):
    worker_id: str
    name: str
    partition: str
    status: Literal["idle", "training", "silent", "dead"] = Field(
        description="silent: sampled for the open round, not answered, and not heard from for longer than a "
                    "worker that is alive stays quiet (it heartbeats while it trains): probably stopped; the round "
                    "still waits for it until --worker-timeout makes it dead")
    last_seen_s: float
    rounds_served: int
    last_train_s: float | None = Field(None, description="seconds its last update took to train locally")


class Waiting(Message):
    """Why the next round has not opened: too few live workers. The run fails at ``fails_at``."""

    waiting_for: list[str] = Field(description="registered workers not heard from within --worker-timeout "
                                               "(id and name), and how many partitions have no worker yet")
    live: int
    needed: int = Field(description="live workers the round needs: --min-workers, else all for the first round "
                                    "and the quorum of a round's sample after it")
    fails_at: float = Field(description="Unix time at which the wait fails the run (--wait-timeout)")


class Status(Message):
    run_id: str
    state: Literal["waiting", "running", "finished", "failed", "stopped"] = Field(
        description="stopped: ended early by a signal to the coordinator; started again on its data dir, it resumes")
    phase: str
    task: str
    round: int = Field(description="last completed training round (0 before the first)")
    rounds: int
    model_version: int
    workers_registered: int
    workers_live: int
    accuracy: float | None
    loss: float | None
    message: str = ""
    waiting: Waiting | None = Field(default=None, description="set while the next round waits for workers")


def one_line(exc: Exception) -> str:
    """A pydantic or JSON error as one readable line naming the field."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
    return str(exc)
