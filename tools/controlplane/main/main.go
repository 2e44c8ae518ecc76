// Command controlplane-apiserver is a small, real Kubernetes API server for local
// end-to-end tests. It runs k8s.io/apiextensions-apiserver standalone (CRDs, custom
// resources, status subresources, server-side apply, watch) and adds a minimal core/v1
// (namespaces, events, secrets, configmaps, nodes; core.go) and coordination.k8s.io/v1
// leases (lease.go), stored in etcd.
//
// The stock apiextensions-apiserver main expects to sit behind a full kube-apiserver.
// Each workaround below is marked "Workaround:" with the reason.
//
// Built in GOPATH mode from Debian's packaged Go sources by ../controlplane/builder.py.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/spf13/pflag"
	noopoteltrace "go.opentelemetry.io/otel/trace/noop"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apiextensions-apiserver/pkg/apihelpers"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/apiserver/pkg/authorization/union"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

func main() {
	ctx := genericapiserver.SetupSignalContext()
	if err := run(ctx, os.Args[1:]); err != nil {
		klog.ErrorS(err, "controlplane-apiserver failed")
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	ro := o.RecommendedOptions
	// Workaround: there is no core kube-apiserver to delegate to. Drop the option groups
	// that need one (CoreAPI kubeconfig + informers, admission plugins, API priority and
	// fairness). Without this the stock server refuses to start, /readyz waits forever for
	// core informers, and the admission plugins log "failed to fetch openapi paths".
	ro.CoreAPI = nil
	ro.Admission = nil
	ro.Features.EnablePriorityAndFairness = false
	// Authentication: client certificates signed by --client-ca-file only (user = CN,
	// groups = O). No TokenReview delegation, no in-cluster configmap lookups.
	ro.Authentication.RemoteKubeConfigFileOptional = true
	ro.Authentication.SkipInClusterLookup = true
	// Authorization: system:masters and the health paths are always allowed (defaults of
	// the delegating options); everyone else goes through authz.go (no SubjectAccessReview).
	ro.Authorization.RemoteKubeConfigFileOptional = true

	fs := pflag.NewFlagSet("controlplane-apiserver", pflag.ContinueOnError)
	o.AddFlags(fs)
	policyFile := fs.String("authorization-policy-file", "", "YAML file with rbac.authorization.k8s.io/v1 Roles, ClusterRoles and bindings (other documents are ignored) used to authorize users outside system:masters; re-read when it changes. Empty: every authenticated user is allowed everything.")
	goflags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(goflags)
	fs.AddGoFlagSet(goflags)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := o.ServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	if err := o.Complete(); err != nil {
		return err
	}
	if err := o.Validate(); err != nil {
		return err
	}

	// The same steps as options.Config() in apiextensions-apiserver, minus the parts that
	// read a core API (the webhook-conversion service resolver uses a Services lister).
	serverConfig := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	if err := o.ServerRunOptions.ApplyTo(&serverConfig.Config); err != nil {
		return err
	}
	if err := ro.ApplyTo(serverConfig); err != nil {
		return err
	}
	if err := o.APIEnablement.ApplyTo(&serverConfig.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return err
	}
	serverConfig.Authorization.Authorizer = union.New(serverConfig.Authorization.Authorizer, newPolicyAuthorizer(*policyFile))

	// OpenAPI: the generated definitions of apiextensions (meta/v1 etc.) plus our core/v1
	// types. The namer uses client-go's scheme, which knows core/v1 only as "v1" (our own
	// core scheme also registers them as __internal, which must not leak into the GVK
	// extensions). v2 is served too, for older clients.
	defs := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(func(ref openapiRef) openapiDefs {
		d := generatedopenapi.GetOpenAPIDefinitions(ref)
		addCoreOpenAPIDefinitions(d, ref)
		return d
	})
	namer := openapinamer.NewDefinitionNamer(apiserver.Scheme, clientgoscheme.Scheme)
	serverConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(defs, namer)
	serverConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(defs, namer)

	config := &apiserver.Config{
		GenericConfig: serverConfig,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*ro.Etcd, serverConfig.ResourceTransformers, serverConfig.StorageObjectCountTracker),
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, serverConfig.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}
	completed := config.Complete()
	// Workaround: apiextensions' Complete() switches discovery off because kube-apiserver's
	// aggregator normally serves /api and /apis. Switch it back on; CRD groups are then
	// added to /apis by syncCRDGroups below.
	completed.GenericConfig.EnableDiscovery = true

	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	s := server.GenericAPIServer

	// Workaround: kopf (and most clients) need core/v1 in discovery; serve a minimal one.
	coreGroup, err := newCoreAPIGroupInfo(ro.Etcd, serverConfig.ResourceTransformers)
	if err != nil {
		return err
	}
	if err := s.InstallLegacyAPIGroup(genericapiserver.DefaultLegacyAPIPrefix, coreGroup); err != nil {
		return err
	}

	// Leases (lease.go), for leader election.
	leaseGroup, err := newLeaseAPIGroupInfo(ro.Etcd, serverConfig.ResourceTransformers)
	if err != nil {
		return err
	}
	if err := s.InstallAPIGroup(leaseGroup); err != nil {
		return err
	}

	if err := syncCRDGroups(server); err != nil {
		return err
	}
	s.AddPostStartHookOrDie("create-default-namespaces", createDefaultNamespaces)

	return s.PrepareRun().RunWithContext(ctx)
}

// syncCRDGroups keeps the unaggregated /apis group list in step with the established
// CRDs. Workaround: apiextensions only feeds the aggregated discovery document (used by
// kubectl) and the per-group /apis/<group>[/<version>] handlers; the plain /apis list
// (used by kopf and other clients) is built by kube-apiserver's aggregator.
func syncCRDGroups(server *apiserver.CustomResourceDefinitions) error {
	lister := server.Informers.Apiextensions().V1().CustomResourceDefinitions().Lister()
	manager := server.GenericAPIServer.DiscoveryGroupManager
	var mu sync.Mutex
	current := map[string]bool{}

	resync := func() {
		mu.Lock()
		defer mu.Unlock()
		crds, err := lister.List(labels.Everything())
		if err != nil {
			klog.ErrorS(err, "listing CRDs for discovery")
			return
		}
		served := map[string]map[string]bool{} // group -> served versions
		for _, crd := range crds {
			if !apihelpers.IsCRDConditionTrue(crd, apiextensionsv1.Established) {
				continue
			}
			for _, v := range crd.Spec.Versions {
				if v.Served {
					if served[crd.Spec.Group] == nil {
						served[crd.Spec.Group] = map[string]bool{}
					}
					served[crd.Spec.Group][v.Name] = true
				}
			}
		}
		for group, versions := range served {
			names := make([]string, 0, len(versions))
			for v := range versions {
				names = append(names, v)
			}
			// Same order as kube-apiserver: GA before beta before alpha, newest first.
			sort.Slice(names, func(i, j int) bool { return version.CompareKubeAwareVersionStrings(names[i], names[j]) > 0 })
			apiGroup := metav1.APIGroup{Name: group}
			for _, v := range names {
				apiGroup.Versions = append(apiGroup.Versions, metav1.GroupVersionForDiscovery{GroupVersion: group + "/" + v, Version: v})
			}
			apiGroup.PreferredVersion = apiGroup.Versions[0]
			manager.AddGroup(apiGroup)
			current[group] = true
		}
		for group := range current {
			if served[group] == nil {
				manager.RemoveGroup(group)
				delete(current, group)
			}
		}
	}
	informer := server.Informers.Apiextensions().V1().CustomResourceDefinitions().Informer()
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(interface{}) { resync() },
		UpdateFunc: func(interface{}, interface{}) { resync() },
		DeleteFunc: func(interface{}) { resync() },
	})
	return err
}

// createDefaultNamespaces creates the namespaces every cluster has. As a post-start hook it
// also gates /readyz, so clients never see a ready server without "default".
func createDefaultNamespaces(hook genericapiserver.PostStartHookContext) error {
	client, err := kubernetes.NewForConfig(hook.LoopbackClientConfig)
	if err != nil {
		return err
	}
	for _, name := range []string{metav1.NamespaceDefault, metav1.NamespaceSystem, metav1.NamespacePublic, corev1.NamespaceNodeLease} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, err := client.CoreV1().Namespaces().Create(hook, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
			if err == nil || apierrors.IsAlreadyExists(err) {
				break
			}
			if time.Now().After(deadline) || hook.Err() != nil {
				return fmt.Errorf("creating namespace %s: %w", name, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

// noServices is the service resolver for CRD conversion webhooks: there are no Services.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("services are not supported by this control plane (%s/%s:%d)", namespace, name, port)
}
