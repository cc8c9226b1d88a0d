"""Run the LM on one packed text document as the training schedule does (text: t = h = w = position)."""

import torch


def one_document_params(length: int):
    from keye_train.model.attention import KeyePackedSeqParams

    cu = torch.tensor([0, length], dtype=torch.int32)
    pos = torch.arange(length).expand(3, -1).clone()
    return KeyePackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=length,
        max_seqlen_kv=length,
        position_ids=pos,
    )


def lm_token_losses(lm, ids, labels=None):
    """Per-token next-token CE of one packed document, or its logits when `labels` is None."""
    params = one_document_params(ids.shape[1])
    return lm(
        input_ids=ids,
        position_ids=params.position_ids[:, None, :],
        attention_mask=None,
        decoder_input=lm.embedding(input_ids=ids, position_ids=None),
        labels=labels,
        packed_seq_params=params,
    )
