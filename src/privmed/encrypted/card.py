"""The public model card (``GET /v1/model``): what any caller may know about the model.

Built from an allow-list, never by copying the artefact's card: fields an artefact may
carry that derive from the training images (``dataset_id``, a hash of them; per-stage
maxima that older compilers stored) are never published. ``ranges`` are the CKKS limits
of each stage, computed here from the parameters; ``calibration`` says where the images
that chose ``output_scale`` (the one published number that depends on them) came from.
``operating_point`` (the threshold chosen on the validation split) and ``performance``
(test-split AUC, sensitivity and specificity with their intervals) are aggregate figures
on held-out images, published as ``results.json`` publishes them, outside the DP
guarantee (docs/privacy.md); they tell the clinic how far to trust a decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from privmed.encrypted.ckks import rotation_steps
from privmed.encrypted.compiler import HEModel, level_limits

if TYPE_CHECKING:
    from privmed.encrypted.server import ServerLimits

PUBLIC_FIELDS = ("model", "input_shape", "class_names", "epsilon", "delta", "run_id",
                 "operating_point", "performance")
UNRECORDED = "unrecorded (compiled before privmed recorded it; may be private)"


def public_card(model: HEModel, limits: ServerLimits) -> dict[str, Any]:
    g, p = model.geometry, model.params
    card: dict[str, Any] = {k: model.card.get(k) for k in PUBLIC_FIELDS}
    card.update({
        "calibration": model.card.get("calibration") or UNRECORDED,
        "geometry": g.to_dict(), "ckks": p.to_dict(), "output_scale": model.output_scale,
        "ranges": {stage: {"limit": limit} for stage, limit in level_limits(p).items()},
        "encodings": {
            "single": {"ciphertexts": 1, "images": 1, "rotations": rotation_steps(p.slots),
                       "score_offsets": model.layout.class_offsets()},
            "batch": {"ciphertexts": g.pixels, "images_per_request": p.slots,
                      "images_charged": p.slots},
        },
        "limits": {"session_ttl_s": limits.session_ttl_s,
                   "max_images_per_session": limits.max_images_per_session,
                   "max_request_bytes": limits.max_request_bytes,
                   "max_context_bytes": limits.max_context_bytes},
    })
    return card
