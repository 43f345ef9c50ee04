"""What an encoder is made of: masks, gates, physical shrinking, checkpoints, accounting."""

from raysparse.structure.accounting import Size, encoder_flops, encoder_sparsity_of, measure, params_per_head, params_per_neuron
from raysparse.structure.adapters import SUPPORTED_MODEL_TYPES, Encoder, layout_for, retrieval_prompt
from raysparse.structure.checkpoint import is_pruned_checkpoint, load_pruned, save_pruned
from raysparse.structure.gates import GateHandle, UnitGates, apply_mask, attach_gates
from raysparse.structure.mask import Mask
from raysparse.structure.shrink import Structure, select_units, shrink, structure_of
from raysparse.structure.rewire import (is_rewired, load_dynamic, prefix_mask, prefix_sparsity, rewire, save_dynamic,
                                        shrink_to)
from raysparse.structure.subnetwork import (Subnetwork, read_subnetwork, shrink_subnetwork, subnetwork_mask,
                                            subnetwork_slices)

__all__ = [
    "Encoder", "GateHandle", "Mask", "SUPPORTED_MODEL_TYPES", "Size", "Structure", "UnitGates", "apply_mask",
    "attach_gates", "encoder_flops", "encoder_sparsity_of", "is_pruned_checkpoint", "layout_for", "load_pruned",
    "measure", "params_per_head", "params_per_neuron", "retrieval_prompt", "save_pruned", "select_units", "shrink", "structure_of",
    "is_rewired", "load_dynamic", "prefix_mask", "prefix_sparsity", "rewire", "save_dynamic", "shrink_to",
    "Subnetwork", "read_subnetwork", "shrink_subnetwork", "subnetwork_mask", "subnetwork_slices",
]
