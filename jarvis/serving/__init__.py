"""The serving layer: the one place where an OpenAI request becomes generations and their results become
the OpenAI response, its Server-Sent Events, or a batch line's body.

`requests` validates wire bodies (an unknown field is a 400 naming it) and turns their sampling options
and output constraints (and a chat's tools) into `GenerationRequest` fields; `chat` and `completions` run
the generations (n choices, several prompts) through the runtime and render them; `responses` translates
the Responses API onto `chat` (its items, typed events and stored conversations); `render` holds the
shared shapes (usage, logprobs, SSE). Routes and the batch plugin call these; none of them knows an engine.
"""
