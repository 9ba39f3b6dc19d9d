"""`lmforge serve`: an OpenAI-compatible HTTP API and a chat page over trained checkpoints.

`errors`: the OpenAI error body and `APIError`. `params`: reading and checking request bodies.
`served`: a loaded checkpoint as the server offers it (chat format, embeddings, classification).
`generation`: one request on the batching scheduler as a stream of text (stop strings, usage).
`sse`: streamed and waited-for responses that cancel their request when the client goes away.
`app`: the Starlette application (routes, API key, the page). `server`: uvicorn on a bound socket.
"""
