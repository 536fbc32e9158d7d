"""Running fedesm jobs: the job bundles (render, export), the NVFLARE simulator, a local provisioned network."""
