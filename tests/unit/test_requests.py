"""Request bodies -> generation requests (gateway/requests.py): pure, against a model's facts."""

from types import SimpleNamespace

import pytest

from gateway.errors import APIError
from gateway.requests import DEFAULT_COMPLETION_TOKENS, chat_request, completion_request, prompt_ids
from gateway.schemas import ChatRequest, CompletionRequest
from tests import tiny


@pytest.fixture(scope="module")
def model():
    """What requests.py needs of a GatewayModel, with the tiny models' character tokenizer."""
    tokenizer = tiny.char_tokenizer()
    return SimpleNamespace(
        name="tiny", vocab_size=tiny.VOCAB, context_length=64, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        adapters={}, grammars=None, sampling_defaults={}, max_token_chars=max(map(len, tokenizer.get_vocab())),
        decode=lambda ids, special=False: tokenizer.decode(ids, skip_special_tokens=not special),
        encode=lambda text: tokenizer(text, add_special_tokens=True).input_ids,
        apply_chat_template=lambda messages, tools=None: tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def completion(**fields):
    return CompletionRequest(model="tiny", **fields)


def test_prompts_of_every_shape_become_token_ids(model):
    assert prompt_ids("ab", model) == [[model.encode("ab")][0]]
    assert prompt_ids(["a", "b"], model) == [model.encode("a"), model.encode("b")]
    assert prompt_ids([5, 6], model) == [[5, 6]]
    assert prompt_ids([[5], [6, 7]], model) == [[5], [6, 7]]
    with pytest.raises(APIError, match="token ids must be in"):
        prompt_ids([5, tiny.VOCAB], model)


def test_defaults_limits_and_sampling(model):
    request = completion_request(completion(prompt=[1, 2, 3], max_tokens=None), model, max_rows=8)
    assert request.max_tokens == DEFAULT_COMPLETION_TOKENS and request.rows == 1
    assert request.max_length == 3 + DEFAULT_COMPLETION_TOKENS
    request = completion_request(completion(prompt=[[1], [2, 3]], n=2, temperature=0, logit_bias={"7": -100},
                                            stop="x"), model, max_rows=8)
    assert request.rows == 4 and request.params.temperature == 0 and request.params.logit_bias == {7: -100.0}
    assert request.stops == ["x"]
    with pytest.raises(APIError, match="at most 3 per request"):
        completion_request(completion(prompt=[[1], [2]], n=2), model, max_rows=3)
    with pytest.raises(APIError, match="maximum context length is 64") as caught:
        completion_request(completion(prompt=[1] * 60, max_tokens=5), model, max_rows=8)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(APIError, match="outside the vocabulary"):
        completion_request(completion(prompt=[1], logit_bias={"999": 1}), model, max_rows=8)
    with pytest.raises(APIError, match="`suffix`"):
        completion_request(completion(prompt=[1], suffix="x"), model, max_rows=8)
    with pytest.raises(APIError, match="at most 3 per request"):  # best_of counts every row it generates
        completion_request(completion(prompt=[1], best_of=4), model, max_rows=3)
    request = completion_request(completion(prompt=[1], best_of=3, n=2), model, max_rows=8)
    assert (request.n, request.keep, request.logprobs, request.scored) == (3, 2, 0, False)


def test_chats_are_rendered_with_the_template_and_fill_the_context_by_default(model):
    body = ChatRequest(model="tiny", messages=[{"role": "developer", "content": "be brief"},
                                               {"role": "user", "content": "hi"}])
    request = chat_request(body, model, max_rows=8)
    ids = request.prompts[0]
    assert ids == model.apply_chat_template([{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"}])
    assert request.max_tokens == 64 - len(ids)
    body = ChatRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3,
                       max_tokens=9)
    assert chat_request(body, model, max_rows=8).max_tokens == 3  # the newer name wins


def test_omitted_sampling_parameters_come_from_the_models_generation_config(model, tmp_path):
    import json

    from gateway.model import sampling_defaults
    from gateway.sampling import SamplingParams

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "eos_token_id": 2}))
    defaults = sampling_defaults(tmp_path, "auto")
    assert defaults == {"temperature": 0.6, "top_p": 0.9}  # only what the file sets; top_k stays off
    assert sampling_defaults(tmp_path, "none") == {}
    assert sampling_defaults(tmp_path / "nowhere", "auto") == {}
    with pytest.raises(Exception, match="no generation_config.json"):
        sampling_defaults(tmp_path / "nowhere", str(tmp_path / "nowhere"))
    configured = SimpleNamespace(**(vars(model) | {"sampling_defaults": defaults}))
    params = completion_request(completion(prompt=[1]), configured, max_rows=8).params
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 0)
    params = completion_request(completion(prompt=[1], temperature=0, top_k=5), configured, max_rows=8).params
    assert (params.temperature, params.top_p, params.top_k) == (0, 0.9, 5)  # the request wins
    assert completion_request(completion(prompt=[1]), model, max_rows=8).params == SamplingParams()
