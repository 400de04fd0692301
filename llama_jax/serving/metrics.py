"""The server's Prometheus metrics (GET /metrics), in a registry of its own."""

import prometheus_client


class ServingMetrics:
  """Requests, queue length, busy slots, generated tokens and time to first token."""
  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter('llama_requests', 'HTTP requests answered.',
                                              ['endpoint', 'status'], registry=self.registry)
    self.queue_length = prometheus_client.Gauge('llama_queue_length',
                                                'Requests waiting for a decode slot.',
                                                registry=self.registry)
    self.slots_busy = prometheus_client.Gauge('llama_slots_busy', 'Decode slots holding a request.',
                                              registry=self.registry)
    self.generated_tokens = prometheus_client.Counter('llama_generated_tokens',
                                                      'Tokens generated (rate() = tokens/s).',
                                                      registry=self.registry)
    self.tokens_per_second = prometheus_client.Gauge('llama_decode_tokens_per_second',
                                                     'Tokens per second of the last decode step.',
                                                     registry=self.registry)
    self.time_to_first_token = prometheus_client.Histogram(
        'llama_time_to_first_token_seconds', 'From arrival to the first generated token.',
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)

  def watch(self, engine):
    """Reads the engine's queue length and busy slots at each scrape."""
    self.queue_length.set_function(lambda: engine.queue_length)
    self.slots_busy.set_function(lambda: engine.slots_busy)

  def exposition(self) -> bytes:
    return prometheus_client.generate_latest(self.registry)
