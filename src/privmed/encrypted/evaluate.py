"""Server side: run an :class:`HEModel` on ciphertexts with the client's public keys.

The server holds the plaintext weights and the client's evaluation keys, never a secret
key, so every value it handles stays encrypted. See ``layout.py`` for the slot layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from privmed.encrypted.ckks import Encoder, from_bytes, galois_elements, seal_context, to_bytes
from privmed.encrypted.compiler import HEModel
from privmed.encrypted.layout import im2col_indices


class EvaluationError(ValueError):
    """The client's input cannot be evaluated (one sentence, answered with HTTP 4xx)."""


@dataclass
class EvaluationKeys:
    relin: Any
    galois: Any | None


class Evaluator:
    """Evaluates one compiled model; plaintexts that do not depend on a request are
    encoded once here."""

    def __init__(self, model: HEModel) -> None:
        self.model = model
        self.params = model.params
        self.ctx = seal_context(model.params)
        self.encoder = Encoder(self.ctx)
        self.ev = seal.Evaluator(self.ctx)
        self.layout = model.layout
        self._levels = self._parms_chain()
        self._single_plaintexts = self._encode_single()
        self._conv_scalars: dict[tuple[int, int], Any] = {}

    # --- keys and ciphertexts -----------------------------------------------------------
    def load_keys(self, relin: bytes, galois: bytes | None) -> EvaluationKeys:
        try:
            rk = from_bytes(seal.RelinKeys, self.ctx, relin)
        except ValueError:
            raise EvaluationError("The relinearisation keys do not match this model's CKKS "
                                  "parameters or are corrupt.") from None
        gk = None
        if galois is not None:
            try:
                gk = from_bytes(seal.GaloisKeys, self.ctx, galois)
            except ValueError:
                raise EvaluationError("The Galois (rotation) keys do not match this model's "
                                      "CKKS parameters or are corrupt.") from None
            steps = self.layout.block_sum_steps() + self.layout.in_block_sum_steps()
            missing = [s for s, e in zip(steps, galois_elements(steps, self.params
                                                                 .poly_modulus_degree),
                                         strict=True) if not gk.has_key(e)]
            if missing:
                raise EvaluationError(f"The Galois keys lack rotations by {missing[:4]}; "
                                      "generate keys for every power-of-two step.")
        return EvaluationKeys(rk, gk)

    def load_input(self, data: bytes) -> Any:
        try:
            ct = from_bytes(seal.Ciphertext, self.ctx, data)
        except ValueError:
            raise EvaluationError("A ciphertext is malformed or was made with other CKKS "
                                  "parameters than this model's.") from None
        if ct.parms_id() != self.ctx.first_parms_id() or ct.size() != 2:
            raise EvaluationError("A ciphertext is not a fresh encryption at the top level; "
                                  "encrypt the input anew.")
        if not math.isclose(ct.scale, self.params.scale, rel_tol=1e-9):
            raise EvaluationError(f"A ciphertext has scale {ct.scale:.6g}; this model takes "
                                  f"2^{self.params.scale_bits}.")
        return ct

    # --- building blocks ----------------------------------------------------------------
    def _parms_chain(self) -> list[tuple[Any, float]]:
        """(parms_id, prime dropped by the next rescale) for each level, top first."""
        out, data = [], self.ctx.first_context_data()
        while data is not None:
            moduli = data.parms().coeff_modulus()
            out.append((data.parms_id(), float(moduli[-1].value())))
            data = data.next_context_data()
        return out

    def _mul_plain(self, ct: Any, pt: Any) -> Any:
        out = seal.Ciphertext()
        self.ev.multiply_plain(ct, pt, out)
        return out

    def _rescale(self, ct: Any) -> Any:
        self.ev.rescale_to_next_inplace(ct)
        return ct

    def _square(self, ct: Any, rk: Any) -> Any:
        out = seal.Ciphertext()
        self.ev.square(ct, out)
        self.ev.relinearize_inplace(out, rk)
        return self._rescale(out)

    def _add_plain(self, ct: Any, values: np.ndarray | float) -> Any:
        pid, scale = ct.parms_id(), ct.scale
        pt = (self.encoder.scalar(values, pid, scale) if np.isscalar(values)
              else self.encoder.vector(values, pid, scale))
        self.ev.add_plain_inplace(ct, pt)
        return ct

    def _rotate_sum(self, ct: Any, steps: list[int], gk: Any) -> Any:
        for step in steps:
            rotated = seal.Ciphertext()
            self.ev.rotate_vector(ct, step, gk, rotated)
            self.ev.add_inplace(ct, rotated)
        return ct

    def _rotate(self, ct: Any, step: int, gk: Any) -> Any:
        for bit in range(step.bit_length()):  # compose from power-of-two keys
            if step >> bit & 1:
                self.ev.rotate_vector_inplace(ct, 1 << bit, gk)
        return ct

    # --- single image: one ciphertext -------------------------------------------------
    def _encode_single(self) -> dict[str, list[Any]]:
        m, lay, g = self.model, self.layout, self.model.geometry
        slots, block = self.params.slots, lay.block
        conv = []
        pid, prime = self._levels[0]
        for c in range(g.conv_channels):
            vec = np.zeros(slots)
            vec[lay.conv_slots()] = m.conv_w[c][:, None]  # every window, kernel weight k
            conv.append(self.encoder.vector(vec, pid, prime))
        fc1 = []
        pid, prime = self._levels[2]
        for c in range(g.conv_channels):
            vec = np.zeros(slots)
            vec[lay.hidden_slots()] = m.fc1_w[:, c * g.windows:(c + 1) * g.windows]
            fc1.append(self.encoder.vector(vec, pid, prime))
        fc2 = []
        pid, prime = self._levels[4]
        for o in range(g.classes):
            vec = np.zeros(slots)
            vec[np.arange(g.hidden) * block] = m.fc2_w[o]
            fc2.append(self.encoder.vector(vec, pid, prime))
        return {"conv": conv, "fc1": fc1, "fc2": fc2}

    def single(self, ct: Any, keys: EvaluationKeys) -> bytes:
        """One image packed by ``layout.pack_single`` -> one ciphertext whose slots hold the
        scores at ``layout.score_slots()`` and zero everywhere else."""
        if keys.galois is None:
            raise EvaluationError("This session has no Galois keys; single-image inference "
                                  "needs them (upload a context with rotations).")
        m, lay, g, pts = self.model, self.layout, self.model.geometry, self._single_plaintexts
        rk, gk = keys.relin, keys.galois
        hidden_in = []
        for c in range(g.conv_channels):
            # Rotations before the rescale: their key-switching noise is then divided by
            # the dropped prime instead of landing at the output's precision.
            y = self._mul_plain(ct, pts["conv"][c])
            self._rescale(self._rotate_sum(y, lay.block_sum_steps(), gk))
            hidden_in.append(self._square(self._add_plain(y, float(m.conv_b[c])), rk))
        z = self._mul_plain(hidden_in[0], pts["fc1"][0])
        for c in range(1, g.conv_channels):
            self.ev.add_inplace(z, self._mul_plain(hidden_in[c], pts["fc1"][c]))
        self._rescale(self._rotate_sum(z, lay.in_block_sum_steps(), gk))
        bias1 = np.zeros(self.params.slots)
        bias1[np.arange(g.hidden) * lay.block] = m.fc1_b
        h2 = self._square(self._add_plain(z, bias1), rk)
        out = None
        for o in range(g.classes):
            t = self._rotate(self._mul_plain(h2, pts["fc2"][o]), o, gk)
            if out is None:
                out = t
            else:
                self.ev.add_inplace(out, t)
        # every block: the full scores
        self._rescale(self._rotate_sum(out, lay.block_sum_steps(), gk))
        bias2 = np.zeros(self.params.slots)
        bias2[lay.score_slots()] = m.fc2_b[:, None]
        return to_bytes(self._add_plain(out, bias2))

    # --- batch: one ciphertext per pixel, images across slots -------------------------
    def _weighted_sum(self, cts: list[Any], weights: np.ndarray, level: int,
                      cache: dict | None = None, key: Any = None) -> Any:
        pid, prime = self._levels[level]
        out, term = None, seal.Ciphertext()
        for i, (ct, w) in enumerate(zip(cts, weights, strict=True)):
            if w == 0.0:  # SEAL refuses products that are exactly zero
                continue
            if cache is not None:
                pt = cache.get((key, i))
                if pt is None:
                    pt = cache[(key, i)] = self.encoder.scalar(w, pid, prime)
            else:
                pt = self.encoder.scalar(w, pid, prime)
            if out is None:
                out = self._mul_plain(ct, pt)
            else:  # in place into one buffer: add_many would copy every ciphertext
                self.ev.multiply_plain(ct, pt, term)
                self.ev.add_inplace(out, term)
        if out is None:
            raise EvaluationError("The model has an all-zero weight row; recompile it.")
        return self._rescale(out)

    def batch(self, cts: list[Any], keys: EvaluationKeys) -> list[bytes]:
        """Pixel ciphertexts (``layout.pack_batch``) -> one ciphertext of scores per class."""
        m, g = self.model, self.model.geometry
        if len(cts) != g.pixels:
            raise EvaluationError(f"Batch encoding needs {g.pixels} ciphertexts (one per pixel "
                                  f"of a {g.in_channels}x{g.height}x{g.width} image), got "
                                  f"{len(cts)}.")
        cols = im2col_indices(g)
        h1 = []
        for c in range(g.conv_channels):
            for w in range(g.windows):
                pixels = [cts[p] for p in cols[w]]
                y = self._weighted_sum(pixels, m.conv_w[c], 0, self._conv_scalars, c)
                h1.append(self._square(self._add_plain(y, float(m.conv_b[c])), keys.relin))
        h2 = [self._square(self._add_plain(self._weighted_sum(h1, m.fc1_w[j], 2),
                                           float(m.fc1_b[j])), keys.relin)
              for j in range(g.hidden)]
        return [to_bytes(self._add_plain(self._weighted_sum(h2, m.fc2_w[o], 4),
                                         float(m.fc2_b[o])))
                for o in range(g.classes)]


def check_encrypted(model: HEModel, images: np.ndarray) -> dict[str, float]:
    """Run ``images`` through the single-image path in this process (fresh keys) and
    compare with the plaintext forward pass: the compiler's end-to-end check."""
    from privmed.encrypted.ckks import SecretKeys
    from privmed.encrypted.layout import pack_single, unpack_single

    keys = SecretKeys(model.params)
    ek = keys.evaluation_keys(rotations=True)
    evaluator = Evaluator(model)
    session = evaluator.load_keys(ek["relin_keys"], ek["galois_keys"])
    plain = model.plain_logits(images)
    enc = np.stack([
        unpack_single(model.layout, keys.decrypt(evaluator.single(evaluator.load_input(
            keys.encrypt(pack_single(model.layout, img))), session))) * model.output_scale
        for img in images])
    return {"images": float(len(images)), "max_abs_error": float(np.abs(enc - plain).max()),
            "same_decisions": float((enc.argmax(1) == plain.argmax(1)).mean())}
