"""Trainable slices of frozen fused parameters: optimizer memory only for the selected experts.

A fused MoE expert parameter (``mlp.experts.gate_up_proj``, ``[experts, rows, cols]``) of which a
layer file selects some slices stays frozen, in the dtype it was loaded in. The selected elements
are copied into one new trainable parameter per fused parameter (``gate_up_proj_spectrum_slices``,
``[selected rows, cols]``), and a forward pre-hook on the owning module writes them into a
composed copy of the fused weight (``torch.index_put``, out of place) that the module's own
forward reads under the parameter's name for that call. So:

- a selected element costs the optimizer's float32 master, gradient and two AdamW moments
  (16 bytes) besides its frozen stored copy; an unselected one only its stored copy;
- while a layer runs, one composed copy of its fused weight and that copy's gradient exist
  (the compute dtype); with gradient checkpointing one layer at a time;
- the fused parameter never changes, so the frozen slices stay bit-identical, and the slice
  parameters are ordinary parameters: DDP averages them, FSDP2 shards them on their first
  dimension like any other, AdamW decays them (the fused weight gets no decay at all);
- ``state_dict()`` is a plain model's (the trained values folded into the fused weight), so
  ``save_pretrained`` and Trainer's saves keep the training, and ``load_state_dict`` of a plain
  state dict refreshes the slices; :func:`merge_slices` makes the model plain again, and
  :func:`merged_state_dict` folds a gathered FSDP2 state dict (sharded tensors are not folded);
- every module holding the parameter (a tied ``lm_head``) reads the composed weight;
- the slice parameter has the fused weight's dtype; train.py makes it float32 like every
  trainable weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: The name a fused parameter's trainable slices get on the same module.
SUFFIX = "_spectrum_slices"
#: The model attribute holding the installed slices (fused parameter name -> Slices).
ATTRIBUTE = "_spectrum_slices"


@dataclass
class Slices:
    """One fused parameter's trainable slices: ``index`` selects them (leading dimensions)."""

    module: str  # the module owning the fused parameter
    leaf: str  # the fused parameter's name on it
    index: tuple[Any, ...]  # CPU index tensors over the leading dimensions
    handles: list[Any] = field(default_factory=list, repr=False)
    _on_device: dict[Any, tuple[Any, ...]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.leaf}" if self.module else self.leaf

    @property
    def slice_name(self) -> str:
        return self.name + SUFFIX

    @property
    def size(self) -> int:
        return int(self.index[0].numel())

    def index_on(self, device) -> tuple[Any, ...]:
        if device not in self._on_device:  # moved once per device, not once per forward
            self._on_device[device] = tuple(i.to(device) for i in self.index)
        return self._on_device[device]

    def compose(self, fused, values):
        """A new tensor: ``fused`` with ``values`` at the selected positions (out of place, so
        the fused weight itself stays untouched; only ``values`` can carry a gradient)."""
        import torch

        return torch.index_put(fused.detach(), self.index_on(fused.device), values.to(fused.dtype))

    def lend(self, owner, leaf: str, module, args) -> None:
        """A holder's forward pre-hook: its ``leaf`` reads the composed weight for this call."""
        fused = module._parameters[leaf]
        values = owner._parameters[self.leaf + SUFFIX]
        # An instance attribute wins over the module's parameter lookup for this forward.
        module.__dict__[leaf] = self.compose(fused, values)

    def fold(self, module, state, prefix, local_metadata) -> None:
        """The owner's state_dict post-hook: the trained values into the fused weight."""
        key, slice_key = prefix + self.leaf, prefix + self.leaf + SUFFIX
        if key not in state or slice_key not in state:
            return
        fused, values = state[key], state[slice_key]
        if hasattr(fused, "device_mesh") or hasattr(values, "device_mesh"):
            return  # FSDP2 shards: the recipe merges the gathered state (merged_state_dict)
        state[key] = self.compose(fused, values.detach())
        del state[slice_key]

    def unfold(self, owner, state, prefix, *args) -> None:
        """The owner's load_state_dict pre-hook: an incoming fused weight refreshes the slices."""
        key, slice_key = prefix + self.leaf, prefix + self.leaf + SUFFIX
        if key in state and slice_key not in state:
            current = owner._parameters[self.leaf + SUFFIX]
            incoming = state[key]
            state[slice_key] = incoming[self.index_on(incoming.device)].to(current.dtype)


def selection_index(shape: Sequence[int], regions: Sequence[tuple[slice, ...]]):
    """Index tensors (one per leading dimension the regions slice) of the union of ``regions``,
    in row-major order, from a mask of those dimensions only."""
    import torch

    depth = max(len(r) for r in regions)
    mask = torch.zeros(tuple(shape[:depth]), dtype=torch.bool)
    for region in regions:
        mask[region] = True
    return mask.nonzero(as_tuple=True)


def install_slices(model: torch.nn.Module, parts: dict[str, Sequence[tuple[slice, ...]]]):
    """Freeze each named fused parameter and give its ``regions`` one trainable tensor (see the
    module docstring). Returns the installed :class:`Slices` by fused parameter name."""
    import torch

    installed = installed_slices(model)
    for name, regions in parts.items():
        module_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_name)
        fused = owner._parameters[leaf]
        index = selection_index(fused.shape, regions)
        with torch.no_grad():
            values = fused.detach()[index].clone()
        fused.requires_grad_(False)
        owner.register_parameter(leaf + SUFFIX, torch.nn.Parameter(values, requires_grad=True))
        slices = Slices(module_name, leaf, index)
        # Every module holding this parameter (a tied lm_head holds the embedding's) reads the
        # composed weight, so both uses train the one slice parameter.
        for holder, holder_leaf in _holders(model, fused):
            slices.handles += [
                holder.register_forward_pre_hook(partial(Slices.lend, slices, owner, holder_leaf)),
                # always_call: activation checkpointing stops a recomputed forward early (an
                # exception inside it) once it has what backward needs; without this the
                # composed copy would outlive its layer until the next step (measured: one
                # more copy of all the experts held between steps).
                holder.register_forward_hook(partial(_release, holder_leaf), always_call=True),
            ]
        # state_dict() stays a plain model's (the trained values in the fused weight, no slice
        # key), so save_pretrained, Trainer.save_model and push_to_hub save the training;
        # load_state_dict refreshes the slices from an incoming fused weight. (Hooks are
        # partials, not bound methods: torch marks a state dict hook with an attribute.)
        slices.handles += [
            owner.register_state_dict_post_hook(partial(Slices.fold, slices)),
            owner._register_load_state_dict_pre_hook(partial(Slices.unfold, slices, owner)),
        ]
        installed[name] = slices
    # A plain attribute, not a module or parameter: it is no part of the state dict.
    object.__setattr__(model, ATTRIBUTE, installed)
    return installed


def _holders(model, param) -> list[tuple[Any, str]]:
    return [
        (module, leaf)
        for module in {id(m): m for m in model.modules()}.values()
        for leaf, held in module._parameters.items()
        if held is param
    ]


def _release(leaf: str, module, args, output) -> None:
    """A holder's forward hook: the composed weight goes with the call."""
    module.__dict__.pop(leaf, None)


def installed_slices(model: torch.nn.Module) -> dict[str, Slices]:
    return getattr(model, ATTRIBUTE, None) or {}


def merge_slices(model: torch.nn.Module) -> None:
    """Write the trained slices into their fused parameters and remove the slice parameters and
    hooks: the model is a plain model again (``save_pretrained`` writes its usual files)."""
    import torch

    for slices in installed_slices(model).values():
        module = model.get_submodule(slices.module)
        fused = module._parameters[slices.leaf]
        values = module._parameters.pop(slices.leaf + SUFFIX)
        with torch.no_grad():
            fused.data[slices.index_on(fused.device)] = values.detach().to(fused.dtype)
        for handle in slices.handles:
            handle.remove()
        for holder, leaf in _holders(model, fused):
            holder.__dict__.pop(leaf, None)
    object.__setattr__(model, ATTRIBUTE, {})


def merged_state_dict(state: dict[str, Any], slices: dict[str, Slices]) -> dict[str, Any]:
    """A full (gathered) state dict with the slice entries written into their fused weights."""
    state = dict(state)
    for name, item in slices.items():
        if item.slice_name in state:  # else folded already (an unsharded state_dict())
            state[name] = item.compose(state[name], state.pop(item.slice_name))
    return state
