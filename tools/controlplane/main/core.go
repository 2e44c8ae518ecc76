package main

// A minimal core/v1 API group ("/api/v1"): namespaces, events, secrets, configmaps and
// nodes, stored in etcd with the apiserver's generic registry store.
//
// Workaround: kopf waits forever (silently) for v1/namespaces in discovery, and operators
// need secrets/events. The real registry code lives in k8s.io/kubernetes/pkg, which
// Debian does not ship, so this file provides the few pieces the generic store needs:
// a scheme, one small strategy, field selectors for events and nodes and OpenAPI
// definitions.
//
// Nodes: there is no kubelet and no node controller. Tests create Node objects directly;
// the whole object, status included, is written on create/update/patch (no status
// subresource, no defaulting of conditions, capacity or nodeInfo, no taint validation).
// Names are DNS subdomains, as in kube-apiserver. Field selectors: metadata.name and
// spec.unschedulable.

import (
	"context"
	"reflect"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/registry/customresource/tableconvertor"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/names"
	storagevalue "k8s.io/apiserver/pkg/storage/value"
	"k8s.io/kube-openapi/pkg/common"
	"k8s.io/kube-openapi/pkg/validation/spec"
)

type openapiRef = common.ReferenceCallback
type openapiDefs = map[string]common.OpenAPIDefinition

var (
	coreScheme = runtime.NewScheme()
	coreCodecs = serializer.NewCodecFactory(coreScheme)

	// The top-level types served; their OpenAPI definitions are generated in
	// addCoreOpenAPIDefinitions.
	coreTypes = []runtime.Object{
		&corev1.Namespace{}, &corev1.NamespaceList{},
		&corev1.Event{}, &corev1.EventList{},
		&corev1.Secret{}, &corev1.SecretList{},
		&corev1.ConfigMap{}, &corev1.ConfigMapList{},
		&corev1.Node{}, &corev1.NodeList{},
	}
	eventFields = []string{"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
		"involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
		"involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"}
)

func init() {
	coreScheme.AddKnownTypes(corev1.SchemeGroupVersion, coreTypes...)
	// Workaround: the internal ("hub") core types exist only in k8s.io/kubernetes. Register
	// the v1 Go types as the internal version as well: the scheme then "converts" between
	// the two by copying, which is all the generic handlers and storage codec need.
	coreScheme.AddKnownTypes(schema.GroupVersion{Version: runtime.APIVersionInternal}, coreTypes...)
	metav1.AddToGroupVersion(coreScheme, corev1.SchemeGroupVersion) // list/get/watch options
	coreScheme.AddUnversionedTypes(schema.GroupVersion{Version: "v1"},
		&metav1.Status{}, &metav1.APIVersions{}, &metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})
	if err := coreScheme.SetVersionPriority(corev1.SchemeGroupVersion); err != nil {
		panic(err)
	}
	// kubectl describe lists events with involvedObject.* field selectors.
	err := coreScheme.AddFieldLabelConversionFunc(corev1.SchemeGroupVersion.WithKind("Event"),
		func(label, value string) (string, string, error) {
			for _, f := range eventFields {
				if label == f {
					return label, value, nil
				}
			}
			return runtime.DefaultMetaV1FieldSelectorConversion(label, value)
		})
	if err != nil {
		panic(err)
	}
	err = coreScheme.AddFieldLabelConversionFunc(corev1.SchemeGroupVersion.WithKind("Node"),
		func(label, value string) (string, string, error) {
			if label == "spec.unschedulable" {
				return label, value, nil
			}
			return runtime.DefaultMetaV1FieldSelectorConversion(label, value)
		})
	if err != nil {
		panic(err)
	}
}

// newCoreAPIGroupInfo builds the storage for /api/v1, in the same etcd as the CRDs.
func newCoreAPIGroupInfo(etcd *genericoptions.EtcdOptions, transformers storagevalue.ResourceTransformers) (*genericapiserver.APIGroupInfo, error) {
	storageConfig := etcd.StorageConfig
	storageConfig.Codec = coreCodecs.LegacyCodec(corev1.SchemeGroupVersion)
	getter := etcd.CreateRESTOptionsGetter(&genericoptions.SimpleStorageFactory{StorageConfig: storageConfig}, transformers)

	info := genericapiserver.NewDefaultAPIGroupInfo("", coreScheme, metav1.ParameterCodec, coreCodecs)
	resources := []resourceDef{
		{"namespaces", "namespace", []string{"ns"}, false,
			func() runtime.Object { return &corev1.Namespace{} }, func() runtime.Object { return &corev1.NamespaceList{} },
			prepareNamespace, nil, apivalidation.ValidateNamespaceName, []string{"Status:string:.status.phase"}, nil},
		{"events", "event", []string{"ev"}, true,
			func() runtime.Object { return &corev1.Event{} }, func() runtime.Object { return &corev1.EventList{} },
			nil, eventAttrs, apivalidation.NameIsDNSSubdomain, []string{"Type:string:.type", "Reason:string:.reason", "Kind:string:.involvedObject.kind",
				"Object:string:.involvedObject.name", "Message:string:.message", "Last Seen:date:.lastTimestamp"}, nil},
		{"secrets", "secret", nil, true,
			func() runtime.Object { return &corev1.Secret{} }, func() runtime.Object { return &corev1.SecretList{} },
			prepareSecret, nil, apivalidation.NameIsDNSSubdomain, []string{"Type:string:.type"}, nil},
		{"configmaps", "configmap", []string{"cm"}, true,
			func() runtime.Object { return &corev1.ConfigMap{} }, func() runtime.Object { return &corev1.ConfigMapList{} },
			nil, nil, apivalidation.NameIsDNSSubdomain, nil, nil},
		// Like kubectl's node columns, as far as JSONPath allows: "Ready" is the Ready
		// condition's status (kubectl derives "Ready"/"NotReady" from it; empty here
		// unless a test sets conditions).
		{"nodes", "node", []string{"no"}, false,
			func() runtime.Object { return &corev1.Node{} }, func() runtime.Object { return &corev1.NodeList{} },
			nil, nodeAttrs, apivalidation.NameIsDNSSubdomain,
			[]string{`Ready:string:.status.conditions[?(@.type=="Ready")].status`, "Version:string:.status.nodeInfo.kubeletVersion",
				"Runtime:string:.status.nodeInfo.containerRuntimeVersion"},
			[]string{`Internal-IP:string:.status.addresses[?(@.type=="InternalIP")].address`,
				`External-IP:string:.status.addresses[?(@.type=="ExternalIP")].address`,
				"OS-Image:string:.status.nodeInfo.osImage", "Kernel-Version:string:.status.nodeInfo.kernelVersion"}},
	}
	v1storage := map[string]rest.Storage{}
	for _, r := range resources {
		store, err := newStore(corev1.GroupName, r, getter)
		if err != nil {
			return nil, err
		}
		if r.plural == "events" {
			// Like kube-apiserver's default --event-ttl.
			store.TTLFunc = func(runtime.Object, uint64, bool) (uint64, error) { return 3600, nil }
		}
		v1storage[r.plural] = store
	}
	info.VersionedResourcesStorageMap["v1"] = v1storage
	return &info, nil
}

// resourceDef describes one resource served from etcd by the generic registry store.
type resourceDef struct {
	plural, singular string
	shortNames       []string
	namespaced       bool
	newObj, newList  func() runtime.Object
	prepare          func(runtime.Object)
	attrs            storage.AttrFunc
	nameFn           apivalidation.ValidateNameFunc
	columns          []string // kubectl get columns: "Name:type:jsonpath"; Age is appended
	wide             []string // the same, shown only with -o wide
}

// newStore builds the generic registry store of one resource of the API group named group.
func newStore(group string, r resourceDef, getter generic.RESTOptionsGetter) (*coreREST, error) {
	// Printer columns the same way as a CRD's additionalPrinterColumns.
	var columns []apiextensionsv1.CustomResourceColumnDefinition
	for i, c := range append(append(r.columns, "Age:date:.metadata.creationTimestamp"), r.wide...) {
		parts := strings.SplitN(c, ":", 3)
		column := apiextensionsv1.CustomResourceColumnDefinition{Name: parts[0], Type: parts[1], JSONPath: parts[2]}
		if i > len(r.columns) { // r.wide
			column.Priority = 1
		}
		columns = append(columns, column)
	}
	table, err := tableconvertor.New(columns)
	if err != nil {
		return nil, err
	}
	strategy := coreStrategy{ObjectTyper: coreScheme, NameGenerator: names.SimpleNameGenerator, namespaced: r.namespaced, nameFn: r.nameFn, prepare: r.prepare}
	store := &genericregistry.Store{
		NewFunc:                   r.newObj,
		NewListFunc:               r.newList,
		DefaultQualifiedResource:  schema.GroupResource{Group: group, Resource: r.plural},
		SingularQualifiedResource: schema.GroupResource{Group: group, Resource: r.singular},
		CreateStrategy:            strategy,
		UpdateStrategy:            strategy,
		DeleteStrategy:            strategy,
		TableConvertor:            table,
	}
	if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: getter, AttrFunc: r.attrs}); err != nil {
		return nil, err
	}
	return &coreREST{Store: store, shortNames: r.shortNames}, nil
}

// coreREST adds short names (kubectl get ns / cm / ev) to the generic store.
type coreREST struct {
	*genericregistry.Store
	shortNames []string
}

func (r *coreREST) ShortNames() []string { return r.shortNames }

// coreStrategy is the create/update/delete strategy shared by all core resources:
// object-name validation (per resource: namespaces are DNS labels, the rest DNS
// subdomains) plus an optional per-resource normalisation.
type coreStrategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	namespaced bool
	nameFn     apivalidation.ValidateNameFunc
	prepare    func(runtime.Object)
}

func (s coreStrategy) NamespaceScoped() bool { return s.namespaced }
func (s coreStrategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	if s.prepare != nil {
		s.prepare(obj)
	}
}
func (s coreStrategy) PrepareForUpdate(_ context.Context, obj, _ runtime.Object) {
	if s.prepare != nil {
		s.prepare(obj)
	}
}
func (s coreStrategy) Validate(_ context.Context, obj runtime.Object) field.ErrorList {
	return apivalidation.ValidateObjectMetaAccessor(mustMeta(obj), s.namespaced, s.nameFn, field.NewPath("metadata"))
}
func (s coreStrategy) ValidateUpdate(ctx context.Context, obj, _ runtime.Object) field.ErrorList {
	return s.Validate(ctx, obj)
}
func (coreStrategy) WarningsOnCreate(context.Context, runtime.Object) []string { return nil }
func (coreStrategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}
func (coreStrategy) Canonicalize(runtime.Object)    {}
func (coreStrategy) AllowCreateOnUpdate() bool      { return false }
func (coreStrategy) AllowUnconditionalUpdate() bool { return true }

func mustMeta(obj runtime.Object) metav1.Object {
	return obj.(metav1.Object)
}

// prepareNamespace: namespaces are Active at once (no finalizers, no cascading delete).
func prepareNamespace(obj runtime.Object) {
	ns := obj.(*corev1.Namespace)
	if ns.Status.Phase == "" {
		ns.Status.Phase = corev1.NamespaceActive
	}
}

// prepareSecret does what kube-apiserver's v1->internal conversion and defaulting do:
// stringData is write-only and folded into data; the type defaults to Opaque.
func prepareSecret(obj runtime.Object) {
	secret := obj.(*corev1.Secret)
	if len(secret.StringData) > 0 && secret.Data == nil {
		secret.Data = map[string][]byte{}
	}
	for k, v := range secret.StringData {
		secret.Data[k] = []byte(v)
	}
	secret.StringData = nil
	if secret.Type == "" {
		secret.Type = corev1.SecretTypeOpaque
	}
}

// eventAttrs exposes the fields that kubectl describe (and kopf) select events by.
func eventAttrs(obj runtime.Object) (labels.Set, fields.Set, error) {
	e := obj.(*corev1.Event)
	return labels.Set(e.Labels), fields.Set{
		"metadata.name":                  e.Name,
		"metadata.namespace":             e.Namespace,
		"involvedObject.kind":            e.InvolvedObject.Kind,
		"involvedObject.namespace":       e.InvolvedObject.Namespace,
		"involvedObject.name":            e.InvolvedObject.Name,
		"involvedObject.uid":             string(e.InvolvedObject.UID),
		"involvedObject.apiVersion":      e.InvolvedObject.APIVersion,
		"involvedObject.resourceVersion": e.InvolvedObject.ResourceVersion,
		"involvedObject.fieldPath":       e.InvolvedObject.FieldPath,
		"reason":                         e.Reason,
		"reportingComponent":             e.ReportingController,
		"source":                         e.Source.Component,
		"type":                           e.Type,
	}, nil
}

// nodeAttrs: the field selectors kube-apiserver offers for nodes.
func nodeAttrs(obj runtime.Object) (labels.Set, fields.Set, error) {
	n := obj.(*corev1.Node)
	return labels.Set(n.Labels), fields.Set{
		"metadata.name":      n.Name,
		"spec.unschedulable": strconv.FormatBool(n.Spec.Unschedulable),
	}, nil
}

// addCoreOpenAPIDefinitions derives OpenAPI schemas for coreTypes and leaseTypes from their Go structs
// (json tags, SwaggerDoc descriptions). Server-side apply needs a definition per served
// kind; the keys must be the model names ("io.k8s.api.core.v1.Secret") or the server
// fails with "cannot find model definition". Nested core structs are inlined; meta/v1
// types refer to the definitions generated in apiextensions-apiserver.
func addCoreOpenAPIDefinitions(defs openapiDefs, ref openapiRef) {
	served := append(append([]runtime.Object{}, coreTypes...), leaseTypes...) // lease.go
	topLevel := map[string]bool{}
	for _, t := range served {
		topLevel[modelName(reflect.TypeOf(t).Elem())] = true
	}
	for _, t := range served {
		var deps []string
		s := schemaFor(reflect.TypeOf(t).Elem(), defs, topLevel, ref, &deps, true)
		defs[modelName(reflect.TypeOf(t).Elem())] = common.OpenAPIDefinition{Schema: s, Dependencies: deps}
	}
}

type modelNamer interface{ OpenAPIModelName() string }
type schemaTyper interface {
	OpenAPISchemaType() []string
	OpenAPISchemaFormat() string
}

func modelName(t reflect.Type) string {
	if m, ok := reflect.Zero(t).Interface().(modelNamer); ok {
		return m.OpenAPIModelName()
	}
	return ""
}

func schemaFor(t reflect.Type, defs openapiDefs, topLevel map[string]bool, ref openapiRef, deps *[]string, root bool) spec.Schema {
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if st, ok := reflect.Zero(t).Interface().(schemaTyper); ok { // metav1.Time, MicroTime
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: st.OpenAPISchemaType(), Format: st.OpenAPISchemaFormat()}}
	}
	if name := modelName(t); name != "" && !root {
		if _, ok := defs[name]; ok || topLevel[name] {
			*deps = append(*deps, name)
			return spec.Schema{SchemaProps: spec.SchemaProps{Ref: ref(name)}}
		}
	}
	switch t.Kind() {
	case reflect.String:
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"string"}}}
	case reflect.Bool:
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"boolean"}}}
	case reflect.Int32:
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"integer"}, Format: "int32"}}
	case reflect.Int64, reflect.Int:
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"integer"}, Format: "int64"}}
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"string"}, Format: "byte"}}
		}
		items := schemaFor(t.Elem(), defs, topLevel, ref, deps, false)
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"array"}, Items: &spec.SchemaOrArray{Schema: &items}}}
	case reflect.Map:
		values := schemaFor(t.Elem(), defs, topLevel, ref, deps, false)
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"object"}, AdditionalProperties: &spec.SchemaOrBool{Allows: true, Schema: &values}}}
	case reflect.Struct:
		s := spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"object"}, Properties: map[string]spec.Schema{}}}
		docs := map[string]string{}
		if d, ok := reflect.Zero(t).Interface().(interface{ SwaggerDoc() map[string]string }); ok {
			docs = d.SwaggerDoc()
			s.Description = docs[""]
		}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if f.Anonymous && name == "" { // `json:",inline"`: metav1.TypeMeta
				inner := schemaFor(f.Type, defs, topLevel, ref, deps, true)
				for k, v := range inner.Properties {
					s.Properties[k] = v
				}
				continue
			}
			if name == "" || name == "-" || !f.IsExported() {
				continue
			}
			p := schemaFor(f.Type, defs, topLevel, ref, deps, false)
			if p.Ref.String() == "" {
				p.Description = docs[name]
			}
			s.Properties[name] = p
		}
		return s
	}
	panic("controlplane: no OpenAPI mapping for " + t.String())
}
