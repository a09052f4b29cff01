"""Shared pieces of the contrastive objectives (SimCLR, MoCo v3): gathers, losses and heads.

Conventions across ranks. Every rank computes the loss of its own anchors (a mean
over its local batch) against candidates gathered from all ranks, and DeepSpeed
averages gradients over ranks. With equal local batches the mean of the rank losses
is the loss of one process on the concatenated batch, and so are the averaged
gradients, provided that the backward of a gather hands each rank the *sum* over
all ranks' losses of the gradient w.r.t. its slice (an all-reduce, as SimCLR's
`tpu_cross_replica_concat` and solo-learn's `GatherLayer`): DeepSpeed's division by
the world size then gives the mean. The same holds for `SyncBatchNorm1d`'s
statistics. Local batches must have the same size on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_size() -> int:
    """Ranks of the default process group; 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if world_size() > 1 else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns, for the local slice, the sum over ranks of its gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every slice
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks; its gradient is again the sum over ranks (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (N, ...) of every rank in rank order: (world * N, ...), differentiable.

    The backward all-reduces the incoming gradient and returns this rank's slice, so the
    local rows receive the gradient of every rank's loss (see the module docstring for
    why that is right when DeepSpeed averages gradients). No-op without torch.distributed.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks with a gradient (the backward sums too). No-op without torch.distributed."""
    if world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (N, ...) of every rank in rank order, without gradient (MoCo's keys)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# --- losses ------------------------------------------------------------------------------------


class ContrastiveLoss(NamedTuple):
    """A contrastive loss and the fraction of local anchors whose positive scores highest."""

    loss: torch.Tensor
    accuracy: torch.Tensor


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> ContrastiveLoss:
    """MoCo v3's contrastive loss (Chen, Xie, He 2021, Alg. 1; moco-v3 moco/builder.py `contrastive_loss`).

    q: (N, D) local queries, k: (N, D) local keys (row i is the positive of query i).
    Both are l2-normalised; keys are gathered from all ranks without gradient (M = world * N);
    logits = q @ k_all.T / T (N, M); labels = the positives' global indices rank * N + i;
    loss = CE(logits, labels) * 2T (the 2T factor makes the gradient scale less
    sensitive to T). Computed in float32.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    keys = concat_all_gather(k.detach())  # (M, D)
    logits = q @ keys.t() / temperature  # (N, M)
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    loss = F.cross_entropy(logits, labels) * (2 * temperature)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return ContrastiveLoss(loss, accuracy)


def queue_contrast(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> ContrastiveLoss:
    """MoCo v2 / MoBY's loss against a queue of negatives (Transformer-SSL models/moby.py `contrastive_loss`).

    q: (N, D) local predictions, k: (N, D) their positive keys, queue: (D, K) earlier keys.
    q and k are l2-normalised; logits = [q . k, q @ queue] / T (N, 1 + K); label 0 (the
    positive) for every row; the mean cross-entropy. No gradient reaches k or the queue.
    Computed in float32.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float().detach(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    negative = q @ queue.detach().float()  # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == 0).float().mean()
    return ContrastiveLoss(loss, accuracy)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> ContrastiveLoss:
    """SimCLR's NT-Xent loss (Chen et al. 2020, Eq. 1 and Alg. 1), negatives from the whole gathered batch.

    z1, z2: (N, D) local projections of the two views (row i of each is a positive pair).
    All projections are l2-normalised and gathered with gradient (M = world * N). Every
    local anchor (2N of them) is scored against all 2M gathered projections except itself
    (cosine / T); its positive is the other view of the same image; the loss is the mean
    cross-entropy over the local anchors, i.e. l(i, j) averaged over the 2N anchors as in
    the paper. (google-research/simclr objective.py sums the two views' means, twice
    this value.) Computed in float32.
    """
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    candidates = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # (2M, D): all view-1, then all view-2
    m = candidates.shape[0] // 2
    anchors = torch.cat([z1, z2])  # (2N, D)
    logits = anchors @ candidates.t() / temperature  # (2N, 2M)
    own = torch.arange(n, device=z1.device) + rank() * n  # global index of each local image
    self_col = torch.cat([own, own + m])  # an anchor's own column
    positive = torch.cat([own + m, own])  # the other view of the same image
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_col), torch.tensor(float("-inf"), device=z1.device))
    loss = F.cross_entropy(logits, positive)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == positive).float().mean()
    return ContrastiveLoss(loss, accuracy)


# --- heads -------------------------------------------------------------------------------------


class _GlobalBatchStats:
    """Training statistics over the batch of every rank (any backend, CPU too), for BatchNorm{1,2}d.

    torch's SyncBatchNorm needs a GPU; MoCo v3 (main_moco.py `convert_sync_batchnorm`) and
    SimCLR (`global_bn`) normalise over the global batch. Mean and variance (per channel, over
    the batch and any spatial positions) are reduced in float32 with `all_reduce_with_grad`,
    two passes (sum, then the sum of squared deviations); running statistics use the global
    count (unbiased variance). Eval mode uses the running statistics, as BatchNorm does.
    Computed in float32 whatever the dtypes of input, affine parameters (bf16 under
    DeepSpeed) and running statistics (buffers stay float32); the output has the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (N, C) or (N, C, H, W)
        dims = [0, *range(2, xf.dim())]
        shape = (1, -1) + (1,) * (xf.dim() - 2)
        if self.training or not self.track_running_stats or self.running_mean is None:
            reduce = all_reduce_with_grad if self.training else (lambda t: t)
            count = xf.new_full((1,), float(xf.numel() // xf.shape[1]))
            sums = reduce(torch.cat([xf.sum(dim=dims), count]))  # (C + 1,)
            total = sums[-1].detach()
            mean = sums[:-1] / total  # (C,)
            var = reduce(((xf - mean.view(shape)) ** 2).sum(dim=dims)) / total  # biased, as BatchNorm normalises
            if self.training and self.track_running_stats and self.running_mean is not None:
                self._update_running_stats(mean.detach(), var.detach(), total)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.float().view(shape) + self.bias.float().view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (total / (total - 1).clamp_min(1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


class SyncBatchNorm1d(_GlobalBatchStats, nn.BatchNorm1d):
    """BatchNorm1d over the global batch (see `_GlobalBatchStats`): the projection heads."""


class SyncBatchNorm2d(_GlobalBatchStats, nn.BatchNorm2d):
    """BatchNorm2d over the global batch (see `_GlobalBatchStats`): a convolutional backbone's BN layers."""


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm2d under `module` made a SyncBatchNorm2d, in place, with its state and names.

    The key names stay (weight, bias, running_mean, running_var, num_batches_tracked), so the
    weights still load strictly into the plain timm model.
    """
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            global_batchnorm(child)
    return module


def projection_mlp(
    num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, *, last_bn: bool = True, out_bias: bool = False
) -> nn.Sequential:
    """MoCo v3's projector/predictor MLP (moco-v3 moco/builder.py `_build_mlp`), also SimCLR's head.

    num_layers x Linear without bias; every hidden layer is followed by BatchNorm and ReLU,
    the last (if last_bn) by BatchNorm without affine parameters ("follow SimCLR's
    design ... removed gamma"). BatchNorms are synchronised over ranks. MoBY's MLP
    (Transformer-SSL models/moby.py `MoBYMLP`): last_bn=False, out_bias=True (its last
    Linear keeps the bias; the hidden ones' biases are cancelled by the BatchNorm anyway).
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs >= 1 layer, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        dim_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=out_bias and last))
        if not last:
            layers += [SyncBatchNorm1d(dim_out), nn.ReLU()]
        elif last_bn:
            layers.append(SyncBatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)
