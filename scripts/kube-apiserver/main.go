// A Kubernetes API server for cellplane's tests: the apiextensions API server (CRDs, server-side
// apply, CEL validation, the status subresource, watch) over a real etcd, with anonymous access
// allowed everything, no admission, and an empty core API list so discovery clients (kubectl,
// helm, kube-rs) are content. It serves CRD groups only; the tests bring Lease and Event as CRDs
// of their own groups. Built from Debian's Go sources by scripts/ensure-tools.sh kube-apiserver.
//
//	kube-apiserver --etcd-servers http://127.0.0.1:2379 --secure-port 6443 --cert-dir DIR
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"

	noopoteltrace "go.opentelemetry.io/otel/trace/noop"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	crdclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/proxy"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	corev1 "k8s.io/client-go/listers/core/v1"
)

func main() {
	etcd := flag.String("etcd-servers", "http://127.0.0.1:2379", "etcd client URLs, comma separated")
	port := flag.Int("secure-port", 6443, "HTTPS port on 127.0.0.1")
	certDir := flag.String("cert-dir", "", "where the self-signed serving certificate is written")
	flag.Parse()
	if err := run(genericapiserver.SetupSignalContext(), *etcd, *port, *certDir); err != nil {
		fmt.Fprintln(os.Stderr, "kube-apiserver:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, etcd string, port int, certDir string) error {
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	r := o.RecommendedOptions
	r.Etcd.StorageConfig.Transport.ServerList = []string{etcd}
	r.SecureServing.BindPort = port
	r.SecureServing.ServerCert.CertDirectory = certDir
	// No kube-apiserver to delegate to: anonymous callers, allowed everything.
	r.Authentication.RemoteKubeConfigFileOptional = true
	r.Authorization.RemoteKubeConfigFileOptional = true
	r.Authorization.AlwaysAllowGroups = append(r.Authorization.AlwaysAllowGroups, "system:unauthenticated")
	r.Admission = nil
	r.CoreAPI = nil
	r.Features.EnablePriorityAndFairness = false
	if err := o.Complete(); err != nil {
		return err
	}
	if err := o.Validate(); err != nil {
		return err
	}
	if err := r.SecureServing.MaybeDefaultWithSelfSignedCerts("localhost", nil, nil); err != nil {
		return err
	}
	serverConfig := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	// Webhook resolution and flow control read core objects through informers; there is no
	// core API here, so they read an empty fake one.
	serverConfig.SharedInformerFactory = informers.NewSharedInformerFactory(fake.NewSimpleClientset(), 0)
	if err := o.ServerRunOptions.ApplyTo(&serverConfig.Config); err != nil {
		return err
	}
	if err := r.ApplyTo(serverConfig); err != nil {
		return err
	}
	if err := o.APIEnablement.ApplyTo(&serverConfig.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return err
	}
	serverConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(
		openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions),
		openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme),
	)
	config := &apiserver.Config{
		GenericConfig: serverConfig,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*r.Etcd, serverConfig.ResourceTransformers, serverConfig.StorageObjectCountTracker),
			ServiceResolver:      services{serverConfig.SharedInformerFactory.Core().V1().Services().Lister()},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, serverConfig.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}
	// Discovery asks for the core API and the list of groups, which a full cluster's
	// kube-apiserver and aggregator answer; here the core API is empty and the groups are the
	// CRDs' own.
	crds, err := crdclient.NewForConfig(serverConfig.LoopbackClientConfig)
	if err != nil {
		return err
	}
	serverConfig.BuildHandlerChainFunc = func(api http.Handler, c *genericapiserver.Config) http.Handler {
		return genericapiserver.DefaultBuildHandlerChain(discovery(api, crds), c)
	}
	server, err := config.Complete().New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	return server.GenericAPIServer.PrepareRun().RunWithContext(ctx)
}

// services resolves conversion webhooks' services; there are none here.
type services struct{ lister corev1.ServiceLister }

func (s services) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return proxy.ResolveCluster(s.lister, namespace, name, port)
}

// discovery answers GET /api (no versions) and GET /apis (apiextensions.k8s.io and every
// CRD's group), and passes everything else to api.
func discovery(api http.Handler, crds crdclient.Interface) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || (r.URL.Path != "/api" && r.URL.Path != "/apis") {
			api.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/api" {
			json.NewEncoder(w).Encode(metav1.APIVersions{
				TypeMeta: metav1.TypeMeta{Kind: "APIVersions", APIVersion: "v1"},
				Versions: []string{},
			})
			return
		}
		list, err := crds.ApiextensionsV1().CustomResourceDefinitions().List(r.Context(), metav1.ListOptions{})
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		json.NewEncoder(w).Encode(groups(list.Items))
	})
}

// groups lists apiextensions.k8s.io and each CRD group with its served versions, the storage
// version preferred.
func groups(items []apiextensionsv1.CustomResourceDefinition) metav1.APIGroupList {
	own := metav1.GroupVersionForDiscovery{GroupVersion: "apiextensions.k8s.io/v1", Version: "v1"}
	out := metav1.APIGroupList{
		TypeMeta: metav1.TypeMeta{Kind: "APIGroupList", APIVersion: "v1"},
		Groups: []metav1.APIGroup{{
			Name:             "apiextensions.k8s.io",
			Versions:         []metav1.GroupVersionForDiscovery{own},
			PreferredVersion: own,
		}},
	}
	index := map[string]int{}
	for _, crd := range items {
		group := crd.Spec.Group
		i, seen := index[group]
		if !seen {
			i = len(out.Groups)
			index[group] = i
			out.Groups = append(out.Groups, metav1.APIGroup{Name: group})
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			gv := metav1.GroupVersionForDiscovery{GroupVersion: group + "/" + v.Name, Version: v.Name}
			known := false
			for _, have := range out.Groups[i].Versions {
				known = known || have == gv
			}
			if !known {
				out.Groups[i].Versions = append(out.Groups[i].Versions, gv)
			}
			if v.Storage {
				out.Groups[i].PreferredVersion = gv
			}
		}
	}
	return out
}
