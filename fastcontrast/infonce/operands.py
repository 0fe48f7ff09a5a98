"""The operands of a fused pass as its kernels see them (Operands, prepare), the product they
form (Product: the keys, their scales, the id mask) and the scores computed on the host beside
the kernels: the positive s_{i,t_i} and the candidates outside the product.

Vocabulary (the same at every layer): query (N, D) the rows; key (M, D) the in-batch keys;
bank (K, D) negatives shared by every row; per_query (N, K, D) negatives of each row; targets
t (N,) the index of each row's positive key; keys = [key; bank] the product's columns;
s_ij = alpha_i beta_j <query_i, keys_j> the scores."""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._host import accumulate_dtype, row_chunks, rowwise_dot

__all__ = ["Operands", "prepare", "Product", "product_of", "positive_chunks", "positive_scores",
           "per_query_scores", "extra_scores", "candidate_count"]


def _inverse_norms(x, normalize, eps, acc):
    """1 / max(||x||, eps) over the last dim in ``acc`` precision (ones when not normalising)."""
    if not normalize:
        return torch.ones(x.shape[:-1], dtype=acc, device=x.device)
    return torch.linalg.vector_norm(x, dim=-1, dtype=acc).clamp_min(eps).reciprocal()


@dataclass
class Operands:
    """The inputs as the kernels see them, in the compute dtype: query (N, D), key (M, D),
    bank (K, D) and per_query (N, K, D) negatives (normalised copies when ``prenormalized``),
    their inverse norms inv_* (1 / max(|row|, eps); ones without normalisation), the scale
    1 / tau and the row scales alpha_i = scale * inv_query_i (scale alone for copies)."""

    query: Tensor
    alpha: Tensor
    scale: Tensor
    inv_query: Tensor
    key: Tensor
    inv_key: Tensor
    bank: Optional[Tensor]
    inv_bank: Optional[Tensor]
    per_query: Optional[Tensor]
    inv_per_query: Optional[Tensor]
    prenormalized: bool

    @property
    def n_key(self):
        return self.key.shape[0]

    def key_scales(self, inv):
        """beta for key-like rows: 1 for normalised copies, the inverse norms otherwise."""
        return torch.ones_like(inv) if self.prenormalized else inv

    def positive_keys(self, targets, r0, r1):
        """key_{t_i} for rows r0..r1; without targets key i itself (a view, no copy)."""
        return self.key[r0:r1] if targets is None else self.key.index_select(0, targets[r0:r1])

    def positive_key_scales(self, targets):
        beta = self.key_scales(self.inv_key)
        return beta if targets is None else beta[targets]


def prepare(fused_pass, query, key, bank, per_query, scale, *, gram=False):
    """Cast to the compute dtype and fold normalisation into scales (or normalised copies).

    ``gram`` (a symmetric-Gram pass, FusedPass.uses_gram) always takes normalised copies: the scales
    alpha_i = 1/(tau |z_i|), beta_j = 1/|z_j| round each score three times over raw products,
    and where a SupCon denominator's gradient meets its positive term's (at low tau and D = 3)
    that cost a factor of plain PyTorch fp32's error; z / |z| once, as plain PyTorch does, meets
    it. The copy is one (N, D) tensor of a one-tensor loss (NT-Xent, SupCon)."""
    props = fused_pass.properties
    cdt = props.compute_dtype(fused_pass.kernel_dtype or query.dtype)
    acc = accumulate_dtype(cdt)
    prenormalized = fused_pass.normalize and (props.prenormalized or gram)

    def prep(t):
        if t is None:
            return None, None
        t = t.to(cdt).contiguous()
        inv = _inverse_norms(t, fused_pass.normalize, fused_pass.eps, acc)
        if prenormalized:
            t = (t.to(acc) * inv.unsqueeze(-1)).to(cdt)
        return t, inv

    query_c, inv_query = prep(query)
    key_c, inv_key = (query_c, inv_query) if key is query else prep(key)  # NT-Xent, SupCon
    bank_c, inv_bank = prep(bank)
    per_query_c, inv_per_query = prep(per_query)
    scale = scale.to(acc)
    alpha = scale * (torch.ones_like(inv_query) if prenormalized else inv_query)
    return Operands(query=query_c, alpha=alpha, scale=scale, inv_query=inv_query, key=key_c,
                    inv_key=inv_key, bank=bank_c, inv_bank=inv_bank, per_query=per_query_c,
                    inv_per_query=inv_per_query, prenormalized=prenormalized)


class Product(NamedTuple):
    """The fused product's columns and their mask: keys = [key; bank] with in-batch negatives,
    else the bank alone (None: no product), beta their scales, (row_ids, col_ids) the id mask
    (None, None: no ids)."""

    keys: Optional[Tensor]
    beta: Optional[Tensor]
    row_ids: Optional[Tensor]
    col_ids: Optional[Tensor]


def product_of(operands, fused_pass, targets, query_ids, bank_ids):
    """The Product of one pass: its keys, their scales and its id mask.

    exclude_positive with in-batch keys: row i masks key t_i (row id t_i, key j has id j), and
    bank_ids are not used (one id per row: objectives run the bank apart under ids).
    (query_ids, bank_ids): a bank entry with the query's id is masked (same instance)."""
    keys, beta = _product_keys(operands, fused_pass)
    row_ids, col_ids = _product_ids(operands, fused_pass, targets, query_ids, bank_ids)
    return Product(keys=keys, beta=beta, row_ids=row_ids, col_ids=col_ids)


def _product_keys(operands, fused_pass):
    """(keys, beta): [key; bank] with in-batch negatives, else the bank alone."""
    parts = ([(operands.key, operands.inv_key)] if fused_pass.in_batch_negatives else [])
    if operands.bank is not None:
        parts.append((operands.bank, operands.inv_bank))
    if not parts:
        return None, None
    if len(parts) == 1:
        keys, inv = parts[0]
    else:
        keys = torch.cat([p[0] for p in parts])
        inv = torch.cat([p[1] for p in parts])
    return keys, operands.key_scales(inv)


def _product_ids(operands, fused_pass, targets, query_ids, bank_ids):
    """(row_ids, col_ids) of the id mask of the fused product (see product_of)."""
    n, device = operands.query.shape[0], operands.query.device
    mask_positive = fused_pass.exclude_positive and fused_pass.in_batch_negatives
    if not mask_positive and query_ids is None:
        return None, None
    cols = []
    if mask_positive:
        row_ids = torch.arange(n, device=device) if targets is None else targets
        cols.append(torch.arange(operands.n_key, device=device))
    else:
        row_ids = query_ids
        if fused_pass.in_batch_negatives:
            cols.append(torch.full((operands.n_key,), -1, dtype=torch.int64, device=device))
    if operands.bank is not None:
        cols.append(bank_ids if (query_ids is not None and not mask_positive) else
                    torch.full((operands.bank.shape[0],), -1, dtype=torch.int64, device=device))
    return row_ids.contiguous(), torch.cat(cols).contiguous()


def positive_chunks(operands, targets):
    """Row ranges of the positive's O(N D) passes: chunks (row_chunks) where a pass makes an
    (N, D) temporary (a gather of key_{t_i}, a cast to the accumulation dtype); one range where
    it works on views alone, so that it is one parallel op and not one per chunk (on a busy CPU
    each waits at its barrier for a descheduled thread)."""
    acc = operands.alpha.dtype
    if targets is None and operands.query.dtype == acc and operands.key.dtype == acc:
        return [(0, operands.query.shape[0])]
    return row_chunks(operands.query.shape[0])


def positive_scores(operands, targets):
    """s_{i, t_i} = alpha_i beta_{t_i} <query_i, key_{t_i}>."""
    dots = torch.empty_like(operands.alpha)
    for r0, r1 in positive_chunks(operands, targets):
        dots[r0:r1] = rowwise_dot(operands.query[r0:r1], operands.positive_keys(targets, r0, r1))
    return operands.alpha * operands.positive_key_scales(targets) * dots


def per_query_scores(operands):
    """s_ik = alpha_i gamma_ik <query_i, n_ik> over per-query negatives (N, K, D): (N, K)."""
    gamma = operands.key_scales(operands.inv_per_query)
    acc = operands.alpha.dtype
    dots = torch.einsum("nd,nkd->nk", operands.query.to(acc), operands.per_query.to(acc))
    return operands.alpha.unsqueeze(1) * gamma * dots


def extra_scores(operands, fused_pass, positive):
    """Scores of candidates outside the fused product, (N, E), or None."""
    extra = []
    if fused_pass.positive_in_extra:
        extra.append(positive.unsqueeze(1))
    if operands.per_query is not None:
        extra.append(per_query_scores(operands))
    return torch.cat(extra, dim=1) if extra else None


def candidate_count(fused_pass, operands):
    """Candidates per row before id masks: the product's keys (or the positive alone), minus
    key i with exclude_self, plus the bank and the per-query negatives."""
    count = 1  # the positive alone
    if fused_pass.in_batch_negatives:
        count = operands.n_key - int(fused_pass.excludes_diagonal)
    count += 0 if operands.bank is None else operands.bank.shape[0]
    return count + (0 if operands.per_query is None else operands.per_query.shape[1])
