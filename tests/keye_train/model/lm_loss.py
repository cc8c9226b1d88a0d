"""Run the LM on one packed text document as train_step does."""

import torch


def lm_token_losses(lm, ids, labels):
    """Per-token next-token CE of one packed document, the way train_step runs the LM."""
    from keye_train.model.attention import KeyePackedSeqParams

    length = ids.shape[1]
    cu = torch.tensor([0, length], dtype=torch.int32)
    pos = torch.arange(length).expand(3, -1).clone()
    params = KeyePackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=length,
        max_seqlen_kv=length,
        position_ids=pos,
    )
    return lm(
        input_ids=ids,
        position_ids=pos[:, None, :],
        attention_mask=None,
        decoder_input=lm.embedding(input_ids=ids, position_ids=None),
        labels=labels,
        packed_seq_params=params,
    )
