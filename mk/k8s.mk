# Kubernetes helpers (included by the root Makefile). See docs/DOCKER.md.
#
# kustomize only reads files inside its own directory, so deploy/kubernetes/ keeps a copy of
# rbac.yaml; tests/unit/test_k8s_manifests.py fails when the copy differs from the original.

.PHONY: k8s-policy k8s-render

k8s-policy:  ## copy rbac.yaml into deploy/kubernetes/ (the ConfigMap source) after editing it
	cp rbac.yaml deploy/kubernetes/rbac.yaml

k8s-render: k8s-policy  ## print the Kubernetes manifests as `kubectl apply -k deploy/kubernetes` would apply them
	kubectl kustomize deploy/kubernetes
