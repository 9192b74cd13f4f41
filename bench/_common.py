"""What the benchmark scripts share, with each other and with the tests (not part of cryid).

- ``DATA_DIR``: the real cries, ``../shared/data/donateacry-cc`` beside the repository (never copied in);
- ``Broker``: a real mosquitto on a free port, in a temporary directory (stoppable, restartable);
- ``child_env``: the environment of a ``cryid run`` child (no inherited ``CRYID_*``, plus the given ones);
- ``DaemonEvents``: a subscriber on ``cryid/#`` that records the daemon's events (with their arrival
  time) and its stats payloads;
- ``build_speechbrain_model_dir``: a seeded, randomly initialised ECAPA-TDNN in the Hugging Face layout.
  No pretrained ECAPA weights exist on the build machine (Hugging Face is unreachable), so benchmarks and
  tests use the published architecture (``speechbrain/spkrec-ecapa-voxceleb``: C=1024, 192-d) with
  seeded random weights, saved exactly like the published repository (``hyperparams.yaml`` with the
  same modules and ``pretrainer``, ``embedding_model.ckpt``, ``mean_var_norm_emb.ckpt``,
  ``classifier.ckpt``, ``label_encoder.txt``), so they go through speechbrain's real loading and
  cryid's real export.

A script run as ``python bench/NAME.py`` imports this as ``_common`` (its folder is on ``sys.path``);
the tests (``tests/fixtures``) import it as ``bench._common``.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DATA_DIR = SHARED_DATA / "donateacry-cc"

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, up: bool, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not go {'up' if up else 'down'} within {timeout_s} s")


class Broker:
    """mosquitto with persistence in a temporary directory, so persistent sessions survive a restart."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"user {getpass.getuser()}",  # running as root, mosquitto would switch to user 'mosquitto'
            "persistence true",
            f"persistence_location {workdir}/",
            "max_queued_messages 100000",
            f"log_dest file {workdir}/mosquitto.log",
        ]
        if users:
            pwfile = workdir / "passwd"
            pwfile.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("broker already running")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL)
        wait_port(self.port, up=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None
        wait_port(self.port, up=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None


def child_env(**cryid: str) -> dict[str, str]:
    """The environment for a ``cryid run`` child: this process's without any ``CRYID_*`` variable (so the
    caller's settings do not leak in), plus ``cryid`` (``CRYID_STATE_DIR=...``, ...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYID_")}
    env.update(cryid)
    return env


class DaemonEvents:
    """A paho subscriber on ``cryid/#`` (QoS 1) that records what a daemon publishes.

    ``arrivals``: (arrival time, payload) of each event (``.../baby/<id>`` other than ``.../state``, and
    ``.../unknown``); ``stats``: each ``.../stats`` payload. Read them after ``stop()``.
    """

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.arrivals: list[tuple[float, dict]] = []
        self.stats: list[dict] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.subscribe("cryid/#", qos=1)
        self._client.loop_start()

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        with self._lock:
            if msg.topic.endswith("/stats"):
                self.stats.append(json.loads(msg.payload))
            elif ("/baby/" in msg.topic and not msg.topic.endswith("/state")) or msg.topic.endswith(
                "/unknown"
            ):
                self.arrivals.append((now, json.loads(msg.payload)))

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


N_FIXTURE_SPEAKERS = 8

HYPERPARAMS_YAML = """\
# ############################################################################
# Model: ECAPA big for Speaker verification
# ############################################################################

# Feature parameters
n_mels: 80

# Pretrain folder (HuggingFace)
pretrained_path: cryid-tests/ecapa-random-seeded

# Output parameters
out_n_neurons: {out_n_neurons}

# Model params
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [{c}, {c}, {c}, {c}, {c3}]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: 192

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 192
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder


pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


def build_speechbrain_model_dir(
    out: Path, seed: int = 20230401, n_speakers: int = N_FIXTURE_SPEAKERS, channels: int = 1024
) -> Path:
    """Write a seeded random ECAPA-TDNN in the Hugging Face layout into ``out`` (created).

    ``channels`` 1024 is the published model; smaller widths keep slow tests fast (same code path).
    """
    import torch
    from hyperpyyaml import load_hyperpyyaml

    out.mkdir(parents=True, exist_ok=True)
    text = HYPERPARAMS_YAML.format(out_n_neurons=n_speakers, c=channels, c3=3 * channels)
    (out / "hyperparams.yaml").write_text(text, encoding="utf-8")
    torch.manual_seed(seed)
    hp = load_hyperpyyaml(text)
    model = hp["embedding_model"].eval()
    # Plausible BatchNorm statistics, so activations are not the untouched identity of a fresh model.
    gen = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=gen))
            mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=gen))
    torch.save(model.state_dict(), out / "embedding_model.ckpt")
    torch.save(hp["classifier"].state_dict(), out / "classifier.ckpt")
    norm = hp["mean_var_norm_emb"]
    norm.glob_mean = 0.01 * torch.randn(192, generator=gen)
    norm.glob_std = torch.ones(192)
    norm.count = 1000
    norm._save(out / "mean_var_norm_emb.ckpt")
    encoder = hp["label_encoder"]
    encoder.update_from_iterable([f"spk{i:04d}" for i in range(n_speakers)])
    encoder.save(out / "label_encoder.txt")
    return out
