"""Run `align ARGS...` with a deliberately broken vLLM adapter sync, for tests/test_vllm.py's sync-check test:
`frozen` never loads a new adapter (and says so: its synced step stays 0); `lying` claims each new step but keeps
serving the first adapter — the silent "rollouts use stale weights" failure. (A subprocess: vLLM starts engine
processes, hence the __main__ guard.)"""

import sys

if __name__ == "__main__":
    from align.cli import main
    from align.stages import vllm_backend

    mode, args = sys.argv[1], sys.argv[2:]
    sync = vllm_backend.VLLMEngine.sync

    def broken_sync(self, model, step):
        if self.request is None:
            return sync(self, model, step)
        if mode == "lying":
            self.synced_step = step

    vllm_backend.VLLMEngine.sync = broken_sync
    sys.exit(main(args))
