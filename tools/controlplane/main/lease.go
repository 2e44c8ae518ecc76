package main

// coordination.k8s.io/v1 leases: what client-go's leaderelection (and any Lease-based
// elector) needs. Namespaced, stored in etcd beside the core resources with the same
// generic registry store, so create, get, list, watch, update with optimistic concurrency
// (a stale metadata.resourceVersion is a 409 Conflict), patch and delete all behave as in
// kube-apiserver. As for nodes, the spec is stored as written: no validation beyond the
// name (kube-apiserver also checks that durations are positive).

import (
	coordinationv1 "k8s.io/api/coordination/v1"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	storagevalue "k8s.io/apiserver/pkg/storage/value"
)

var leaseTypes = []runtime.Object{&coordinationv1.Lease{}, &coordinationv1.LeaseList{}}

func init() {
	// The same workaround as core/v1's (core.go): the v1 types double as the internal ones.
	coreScheme.AddKnownTypes(coordinationv1.SchemeGroupVersion, leaseTypes...)
	coreScheme.AddKnownTypes(schema.GroupVersion{Group: coordinationv1.GroupName, Version: runtime.APIVersionInternal}, leaseTypes...)
	metav1.AddToGroupVersion(coreScheme, coordinationv1.SchemeGroupVersion)
	if err := coreScheme.SetVersionPriority(coordinationv1.SchemeGroupVersion); err != nil {
		panic(err)
	}
}

// newLeaseAPIGroupInfo builds the storage for /apis/coordination.k8s.io/v1.
func newLeaseAPIGroupInfo(etcd *genericoptions.EtcdOptions, transformers storagevalue.ResourceTransformers) (*genericapiserver.APIGroupInfo, error) {
	storageConfig := etcd.StorageConfig
	storageConfig.Codec = coreCodecs.LegacyCodec(coordinationv1.SchemeGroupVersion)
	getter := etcd.CreateRESTOptionsGetter(&genericoptions.SimpleStorageFactory{StorageConfig: storageConfig}, transformers)

	info := genericapiserver.NewDefaultAPIGroupInfo(coordinationv1.GroupName, coreScheme, metav1.ParameterCodec, coreCodecs)
	store, err := newStore(coordinationv1.GroupName, resourceDef{
		plural: "leases", singular: "lease", namespaced: true,
		newObj:  func() runtime.Object { return &coordinationv1.Lease{} },
		newList: func() runtime.Object { return &coordinationv1.LeaseList{} },
		nameFn:  apivalidation.NameIsDNSSubdomain,
		columns: []string{"Holder:string:.spec.holderIdentity"}, // as kubectl shows them
	}, getter)
	if err != nil {
		return nil, err
	}
	info.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{"leases": store}
	return &info, nil
}
